"""The consolidated export as a checkpoint part: the whole DiT in bf16, official layout, streamed from
any engine's full_state."""

from pathlib import Path

import torch
import torch.distributed as dist

from train.checkpoint_io import fsync_tree, write_json
from train.engines.base import Engine
from wan import WanModel
from wan.modules.dit_weights import CONFIG_NAME, WEIGHTS_NAME
from wan.modules.lora import LoRASpec, merge_adapter_stream
from wan.modules.safetensors_io import ShardItem, index_name, parse_size, plan_shards, write_safetensors_streaming


class ConsolidatedWeights:
    """A checkpoint part: the whole DiT in bf16, official layout, in `consolidated/` (VideoX-Fun's
    zero3_save_16bit_model): config.json + diffusion_pytorch_model*.safetensors, loadable with
    WanModel.from_pretrained or as [model] transformer_path. Collective: the engine streams the full
    weights one tensor at a time (gathered from the shards where the engine shards them) and rank 0 writes
    them as they come, so no rank holds the whole model."""

    FOLDER = "consolidated"

    def __init__(
        self,
        engine: Engine,
        dit_config: dict,
        max_shard_size: str = "10GB",
        lora: LoRASpec | None = None,
        subfolder: str = "",
    ):
        self.engine, self.dit_config, self.max_shard_size = engine, dit_config, max_shard_size
        self.lora = lora  # a LoRA run: its adapters are merged into the weights written
        # A Wan2.2 A14B expert's: consolidated/high_noise_model/ (the release's layout, a transformer_path).
        self.folder = f"{self.FOLDER}/{subfolder}" if subfolder else self.FOLDER

    def save(self, folder: Path) -> list[str]:
        with torch.device("meta"):
            shapes = {name: tuple(t.shape) for name, t in WanModel(**self.dit_config).state_dict().items()}
        stream = self.engine.full_state()
        if self.lora is not None:
            stream = iter(merge_adapter_stream(stream, self.lora.scale))
        if dist.is_initialized() and dist.get_rank() != 0:
            for _ in stream:  # collective: gather alongside rank 0, write nothing
                pass
            return []
        out = folder / self.folder
        out.mkdir(parents=True, exist_ok=True)
        items = [ShardItem(name, name, shape, torch.bfloat16) for name, shape in shapes.items()]
        shards = plan_shards(items, parse_size(self.max_shard_size), WEIGHTS_NAME)

        def produce(item: ShardItem) -> torch.Tensor:
            name, tensor = next(stream)
            assert name == item.name, (name, item.name)  # full_state follows state_dict order
            return tensor

        for file, shard in shards:
            write_safetensors_streaming(out / file, shard, produce)
        assert next(stream, None) is None, "full_state yielded more tensors than the DiT has"
        files = [file for file, _ in shards]
        if len(shards) > 1:
            index = {
                "metadata": {"total_size": sum(i.nbytes for i in items)},
                "weight_map": {i.key: file for file, shard in shards for i in shard},
            }
            write_json(out / index_name(WEIGHTS_NAME), index)
            files.append(index_name(WEIGHTS_NAME))
        write_json(out / CONFIG_NAME, {"_class_name": "WanModel", **self.dit_config})
        fsync_tree(out)
        return [f"{self.folder}/{name}" for name in [*files, CONFIG_NAME]]

    def load(self, folder: Path) -> None:
        pass  # an export: training resumes from the engine's own state
