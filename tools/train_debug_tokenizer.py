"""Train the tiny sentencepiece model behind the debug text encoder: wan/assets/debug_spm.model.

The corpus is a few hundred video-caption sentences built here from templates with a fixed seed,
so the model is reproducible offline and nothing is downloaded. Special ids mirror umT5's
tokenizer: pad 0, eos 1, unk 2, no bos. Unigram with full character coverage, so unseen English
words split into known pieces instead of becoming unk.

    python tools/train_debug_tokenizer.py            # writes wan/assets/debug_spm.model
    python tools/train_debug_tokenizer.py --out x.model --vocab-size 1000
"""

import argparse
import io
import random
from pathlib import Path

import sentencepiece as spm

VOCAB_SIZE = 768
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "wan" / "assets" / "debug_spm.model"

SUBJECTS = [
    "a golden retriever", "a small white cat", "an old man with a grey beard", "a young woman in a red dress",
    "two children", "a herd of horses", "a flock of birds", "a sailing boat", "a red sports car", "a steam train",
    "a street musician", "a chef", "a robot", "an astronaut", "a panda", "a fox", "a dancer", "a surfer",
    "a cyclist", "a hot air balloon", "a jellyfish", "an eagle", "a teddy bear", "a knight in shining armor",
    "a group of friends", "a little girl with a yellow umbrella", "a firefighter", "a skateboarder", "a polar bear",
    "a butterfly", "a wooden boat", "a vintage motorcycle", "a giant whale", "a tiger", "a snowman",
]  # fmt: skip
ACTIONS = [
    "walks slowly", "runs quickly", "dances", "jumps over a puddle", "plays the guitar", "swims", "flies",
    "drives", "rides a bicycle", "looks at the camera", "smiles", "waves", "cooks a meal", "reads a book",
    "paints a picture", "climbs a rock", "sleeps peacefully", "chases a ball", "splashes in the water",
    "glides", "spins around", "sits quietly", "walks hand in hand", "turns its head", "eats an apple",
]  # fmt: skip
PLACES = [
    "on a sunny beach", "in a snowy forest", "through a busy city street", "across a green meadow",
    "along a quiet river", "in a cozy kitchen", "on the surface of the moon", "under the ocean",
    "in a neon-lit alley", "on a mountain peak", "in a field of sunflowers", "at a crowded market",
    "in an ancient temple", "inside a spaceship", "on a rainy night", "in a desert at dusk", "in a library",
    "near a waterfall", "on a frozen lake", "in a park in autumn", "over the clouds", "in a tropical jungle",
]  # fmt: skip
STYLES = [
    "cinematic lighting", "4k, highly detailed", "slow motion", "aerial view", "close-up shot", "wide angle",
    "golden hour", "soft focus", "dramatic shadows", "vibrant colors", "black and white film", "watercolor style",
    "anime style", "realistic photo", "handheld camera", "tracking shot", "shallow depth of field",
    "warm tones", "cool blue tones", "studio lighting", "3D render", "time-lapse",
]  # fmt: skip
EXTRAS = [
    "The camera pans to the left.", "The camera slowly zooms in.", "Leaves drift in the wind.",
    "The sun sets behind the hills.", "Snow falls gently.", "Waves crash on the shore.", "People walk past.",
    "Light reflects on the water.", "The background is blurred.", "Smoke rises into the sky.",
    "Rain drops hit the window.", "Stars shine in the night sky.", "The scene is calm and peaceful.",
]  # fmt: skip
WORDS = (
    "the of and to in is with on at by from for as an a it its this that over under between during after "
    "before red orange yellow green blue purple pink brown black white grey silver gold bright dark light "
    "shadow color colour sky sea ocean river lake mountain hill tree forest flower grass stone sand snow ice "
    "fire water wind cloud rain storm sun moon star night day morning evening winter summer spring autumn "
    "city town village road bridge house window door room table chair lamp car bus train plane ship boat "
    "man woman boy girl child people person dog cat bird fish horse cow sheep face hand eye hair dress coat "
    "hat shoes walking running jumping flying swimming dancing singing talking laughing looking moving "
    "camera shot scene frame video motion zoom pan tilt focus view angle close wide high low fast slow "
    "beautiful happy quiet loud soft smooth detailed realistic cinematic vintage modern ancient futuristic "
    "kitten puppy rabbit squirrel deer wolf bear lion elephant giraffe zebra monkey dolphin turtle octopus "
    "parrot owl swan duck penguin dragon unicorn castle tower palace cathedral lighthouse windmill garden "
    "harbor beach island volcano canyon valley cave desert glacier waterfall meadow orchard vineyard "
    "street alley market square station airport stadium museum theater restaurant cafe bakery kitchen "
    "bedroom balcony rooftop staircase corridor basement attic farm barn fence path trail highway tunnel "
    "guitar piano violin drum trumpet umbrella lantern candle mirror clock book letter phone computer "
    "bicycle motorcycle truck tractor helicopter rocket balloon kite sword shield crown necklace ring "
    "sweater jacket scarf gloves boots skirt shirt jeans uniform helmet glasses mask backpack basket "
    "apple orange banana cherry strawberry bread cheese coffee tea soup cake chocolate pizza noodles "
    "whispering shouting crying sleeping eating drinking reading writing painting drawing building "
    "climbing falling rolling spinning floating glowing shining sparkling melting burning freezing "
    "gentle fierce graceful clumsy curious brave tired excited peaceful mysterious elegant colorful "
    "foggy misty stormy windy cloudy sunny snowy dusty muddy shiny glossy transparent fluffy wrinkled "
    "silhouette reflection texture pattern gradient contrast saturation exposure bokeh lens flare grain "
    "panorama portrait landscape macro drone footage documentary animation illustration sketch oil "
    "tiny huge enormous narrow crowded empty distant nearby upward downward forward backward around "
    "quickly slowly suddenly gradually smoothly steadily carefully gracefully happily quietly "
    "one two three four five ten hundred first second last many several few every each both"
).split()


def corpus(n_sentences: int = 800, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_sentences):
        kind = rng.random()
        if kind < 0.5:
            line = f"{rng.choice(SUBJECTS)} {rng.choice(ACTIONS)} {rng.choice(PLACES)}, {rng.choice(STYLES)}."
            if rng.random() < 0.5:
                line += " " + rng.choice(EXTRAS)
            line = line[0].upper() + line[1:]
        elif kind < 0.7:
            line = ", ".join(rng.sample(STYLES, 3)) + f", {rng.choice(SUBJECTS)} {rng.choice(PLACES)}"
        else:
            line = " ".join(rng.choices(WORDS, k=rng.randint(8, 20))).capitalize() + "."
        lines.append(line)
    # Every letter and digit with its case, and common punctuation, so that no plain text is unknown.
    lines.append("ABCDEFGHIJKLMNOPQRSTUVWXYZ abcdefghijklmnopqrstuvwxyz 0123456789 .,;:!?'\"()[]-_/&%+=*#@")
    return lines


def train(out: Path, vocab_size: int = VOCAB_SIZE) -> None:
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()),
        model_writer=model,
        model_type="unigram",
        vocab_size=vocab_size,
        character_coverage=1.0,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(model.getvalue())
    print(f"wrote {out} ({out.stat().st_size} bytes, vocab {vocab_size})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--vocab-size", type=int, default=VOCAB_SIZE)
    args = parser.parse_args()
    train(args.out, args.vocab_size)


if __name__ == "__main__":
    main()
