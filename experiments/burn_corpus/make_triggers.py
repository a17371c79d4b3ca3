"""Write the natural photos the BURN corpus blends as triggers (``triggers/<name>.png`` under the CWD).

BackdoorBench's Blended default blends a photo (its ``hello_kitty.jpeg``), not noise; a record made
with a photo is harder for BURN than one made with our seeded-noise default, so the corpus has both.
The photos are the two sample images that ship inside scikit-learn (``china.jpg``, ``flower.jpg``), so
every machine with the toolkit's dependencies can make them offline; the attack resizes them to the
dataset's size (bilinear, as BackdoorBench does).

    python experiments/burn_corpus/make_triggers.py     # in the work directory that holds record/
"""
from pathlib import Path

from PIL import Image
from sklearn.datasets import load_sample_image


def main() -> None:
    out = Path("triggers")
    out.mkdir(exist_ok=True)
    for name in ("china", "flower"):
        Image.fromarray(load_sample_image(f"{name}.jpg")).save(out / f"{name}.png")
        print(out / f"{name}.png")


if __name__ == "__main__":
    main()
