"""A rank dies with a torchrun agent killed while the rank starts, also under a child subreaper (systemd
--user, `tini -s`: an ancestor that adopts orphans instead of init, so the orphan's parent is not pid 1).

A subreaper process starts a fake agent, which starts `python -m train.main` as torchrun starts a rank
(its environment, a session of its own). The agent is SIGKILLed: (a) while the rank imports torch,
after train.main's first lines; (b) at once, before the rank runs any of our code, with the agent's pid
exported as launch/*.sh export it. The subreaper adopts the rank and reaps it: it must have died of the
parent-death signal within a few seconds. A rank that outlived its agent would wait for its peers for
the process group's 30-minute timeout."""

import json
import os
import signal
import subprocess
import sys

import pytest
from ranks import free_port
from train_runs import REPO

AGENT_PID_ENV = "WAN_TRAIN_AGENT_PID"  # launch/*.sh export it (checked below); train/guard.py reads it

SUBREAPER = r"""
import ctypes, json, os, signal, subprocess, sys, time

PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>
assert ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
case, port, out, agent_pid_env = sys.argv[1:5]

AGENT = '''
import os, subprocess, sys, time
case, port, out, agent_pid_env = sys.argv[1:5]
env = {**os.environ, "TORCHELASTIC_RUN_ID": "test", "RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2",
       "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
if case == "named":
    env[agent_pid_env] = str(os.getpid())  # as launch/*.sh export it before they exec torchrun
cmd = [sys.executable, "-m", "train.main", "--cfg", "configs/debug.toml", f"--output_dir={out}"]
rank = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
print(rank.pid, flush=True)
time.sleep(600)
'''
agent = subprocess.Popen([sys.executable, "-c", AGENT, *sys.argv[1:5]], stdout=subprocess.PIPE)
rank = int(agent.stdout.readline())
if case == "importing":  # torch's libraries are loading: past train.main's first lines, long before main()
    t0 = time.monotonic()
    while not any("libtorch" in line for line in open(f"/proc/{rank}/maps")):
        assert time.monotonic() - t0 < 120, "the rank never imported torch"
        time.sleep(0.002)
agent.kill()
agent.wait()
killed = time.monotonic()
while True:  # the rank is this process's child now: adopted
    pid, status = os.waitpid(rank, os.WNOHANG)
    if pid:
        report = {"signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
                  "exit": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None}
        break
    if time.monotonic() - killed > 5:
        os.kill(rank, signal.SIGKILL)
        os.waitpid(rank, 0)
        report = {"signal": None, "exit": None, "alive": True}
        break
    time.sleep(0.02)
report["after_s"] = round(time.monotonic() - killed, 2)
print(json.dumps(report), flush=True)
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl and /proc")
@pytest.mark.parametrize("case", ["importing", "named"])
def test_a_rank_dies_with_an_agent_killed_during_its_start_under_a_subreaper(tmp_path, case):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop(AGENT_PID_ENV, None)
    cmd = [sys.executable, "-c", SUBREAPER, case, str(free_port()), str(tmp_path / "out"), AGENT_PID_ENV]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.splitlines()[-1])
    assert report["signal"] == signal.SIGKILL, f"the rank outlived its agent: {report}"
    print(f"{case}: the rank died {report['after_s']} s after its agent")
    if case == "named":
        for script in ("single_node.sh", "multi_node.sh"):
            assert f"export {AGENT_PID_ENV}=$$" in (REPO / "launch" / script).read_text(), script
