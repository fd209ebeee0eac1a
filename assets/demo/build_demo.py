"""Rebuild the demo images, manifest.csv and README.md of assets/demo from their sources.

Sources are the sample images that ship inside scikit-image and matplotlib wheels, so the
script runs offline: ``python assets/demo/build_demo.py`` (needs scikit-image). Every
image is public domain or CC0 as stated by the shipping package; crops are marked as such.
Captions are written for this project.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
LONG_SIDE = 512
JPEG_QUALITY = 90


@dataclass(frozen=True)
class Entry:
    file: str
    subject: str
    source: str  # skimage.data function, or matplotlib sample file
    crop: tuple[int, int, int, int] | None  # (left, top, right, bottom) in source pixels
    content: str
    origin: str
    licence: str
    captions: tuple[str, ...]


_PD_NASA = "Public domain (NASA)"
ENTRIES = [
    Entry("astronaut.jpg", "person", "astronaut", None,
          "Astronaut Eileen Collins in a launch suit",
          "NASA Great Images database (flic.kr/p/r9qvLn)", _PD_NASA,
          ("A smiling astronaut in an orange flight suit next to her helmet, in front of an American flag.",
           "Official portrait of a female astronaut with a space shuttle model behind her.",
           "A woman with short blond hair wearing an orange pressure suit.")),
    Entry("shuttle_model.jpg", "object", "astronaut", (340, 0, 500, 250),
          "Crop of astronaut: the space shuttle model",
          "NASA Great Images database (flic.kr/p/r9qvLn)", _PD_NASA,
          ("A white model of the space shuttle standing upright.",
           "A small replica space shuttle with its brown external tank and two white boosters.")),
    Entry("cameraman.jpg", "person", "camera", None,
          "A man filming with a camera on a tripod (grayscale)",
          "Photograph by Lav Varshney", "CC0 (Lav Varshney)",
          ("A black and white photo of a man looking through a film camera on a tripod.",
           "A photographer in a dark coat filming on a grassy field.",
           "A man operating a camera on a tripod outdoors, with buildings in the distance.")),
    Entry("skyline.jpg", "scene", "camera", (330, 0, 512, 220),
          "Crop of camera: distant buildings with a dome and a tower",
          "Photograph by Lav Varshney", "CC0 (Lav Varshney)",
          ("A black and white view of distant buildings with a large dome and a tall tower.",
           "A city skyline under a pale, empty sky.")),
    Entry("grace_hopper.jpg", "person", "matplotlib sample_data/grace_hopper.jpg", None,
          "Portrait of Commodore Grace M. Hopper in US Navy uniform",
          "Official US Navy portrait (Wikimedia Commons: \"Commodore Grace M. Hopper, USN (covered).jpg\")",
          "Public domain (work of the US federal government; matplotlib ships it without a licence note)",
          ("Portrait of an elderly woman in a navy uniform and cap, in front of an American flag.",
           "A naval officer with glasses and medal ribbons posing for an official photo.",
           "An older woman in a dark military uniform against a blue background.")),
    Entry("cat.jpg", "animal", "chelsea", None,
          "Chelsea the cat, a tabby, face close-up",
          "Photograph by Stefan van der Walt", "CC0 (Stefan van der Walt)",
          ("Close-up of a tabby cat's face with green eyes.",
           "A brown striped cat looking at the camera.",
           "The face of a short-haired cat with long white whiskers.")),
    Entry("cat_eye.jpg", "animal", "chelsea", (230, 20, 451, 220),
          "Crop of chelsea: one eye and striped fur",
          "Photograph by Stefan van der Walt", "CC0 (Stefan van der Walt)",
          ("A close-up of one green eye of a tabby cat.",
           "Striped brown fur around a cat's eye, with a blurred background.")),
    Entry("horse.png", "animal", "horse", None,
          "Black silhouette of a horse (a drawing, not a photograph)",
          "openclipart.org, 'horse' by Andreas Preuss (marauder)", "CC0 (Andreas Preuss)",
          ("A black silhouette of a horse standing sideways on a white background.",
           "A simple drawing of a horse in profile, filled solid black.")),
    Entry("coffee.jpg", "object", "coffee", None,
          "A cup of coffee with a saucer and spoon on a wooden table",
          "Photograph by Rachel Michetti, courtesy of Pikolo Espresso Bar", "CC0 (Rachel Michetti)",
          ("A cup of coffee on a red saucer with a spoon, on a wooden table.",
           "An espresso cup and saucer on warm brown wood, seen from above.",
           "A red cup with a white inside, filled with black coffee, a spoon resting on the saucer.")),
    Entry("wood_grain.jpg", "texture", "coffee", (460, 0, 600, 150),
          "Crop of coffee: the wooden table top",
          "Photograph by Rachel Michetti, courtesy of Pikolo Espresso Bar", "CC0 (Rachel Michetti)",
          ("Close-up of a worn wooden table surface with visible grain.",
           "Warm brown wood texture lit from the side.")),
    Entry("clock.jpg", "object", "clock", None,
          "A wall clock blurred by horizontal camera motion (grayscale)",
          "Photograph by Stefan van der Walt", "Public domain (Stefan van der Walt)",
          ("A round wall clock blurred by camera motion.",
           "A white clock face smeared sideways against a plain gray wall.",
           "A blurry black and white photo of a clock hanging on a wall.")),
    Entry("rocket.jpg", "scene", "rocket", None,
          "Falcon 9 carrying DSCOVR on its launch pad at dusk",
          "SpaceX Photos on Flickr (photos/spacexphotos/16511594820)", "Public domain (SpaceX)",
          ("A rocket standing on its launch pad at dusk, lit by floodlights.",
           "A white rocket between tall lattice towers under a deep blue evening sky.",
           "A launch site at night with bright lamps around the base of a rocket.")),
    Entry("launch_towers.jpg", "scene", "rocket", (0, 0, 220, 427),
          "Crop of rocket: lightning towers and floodlights",
          "SpaceX Photos on Flickr (photos/spacexphotos/16511594820)", "Public domain (SpaceX)",
          ("Steel lattice towers against a dark blue sky, with bright lights below.",
           "Tall metal towers at a launch site at twilight.")),
    Entry("hubble_deep_field.jpg", "science", "hubble_deep_field", None,
          "Hubble eXtreme Deep Field",
          "HubbleSite news release 2012/37", _PD_NASA,
          ("Thousands of distant galaxies scattered across a black sky.",
           "A deep space telescope image full of small colorful galaxies.",
           "Spiral and elliptical galaxies of many colors on a dark background.")),
    Entry("galaxies.jpg", "science", "hubble_deep_field", (300, 300, 600, 600),
          "Crop of hubble_deep_field: a few bright galaxies",
          "HubbleSite news release 2012/37", _PD_NASA,
          ("A close-up of a few bright galaxies among faint specks on black.",
           "Small orange, white and blue galaxies in deep space.")),
    Entry("handwriting.jpg", "text", "text", None,
          "Handwritten equations on ruled paper, seen at a slant (grayscale)",
          "Wikipedia, File:Corner.png", "Public domain (as stated by scikit-image)",
          ("Handwritten math equations on lined paper, seen at a slant.",
           "A close-up of handwritten notes with fractions and brackets on a page.",
           "A black and white photo of handwriting on ruled paper.")),
    Entry("brick.jpg", "texture", "brick", None,
          "A brick wall, perspective-corrected (grayscale)",
          "CC0Textures, Bricks25", "CC0",
          ("Rows of long dark gray bricks with light mortar lines.",
           "A brick wall texture in black and white.")),
    Entry("grass.jpg", "texture", "grass", None,
          "Grass blades (grayscale)",
          "DeviantArt, 'Grass-01' by linolafett", "CC0",
          ("A dense patch of grass blades seen from above, in black and white.",
           "Close-up texture of a lawn.")),
    Entry("gravel.jpg", "texture", "gravel", None,
          "Gravel (grayscale)",
          "CC0Textures, Gravel04", "CC0",
          ("Small gray stones of gravel filling the whole frame.",
           "A close-up of loose gravel, seen from above.")),
    Entry("cell.jpg", "science", "cell", None,
          "Quantitative phase image of a cell floating in saline",
          "Müller et al., Optics Express 26(8):10729 (2018)", "CC0",
          ("A single round cell shown as a bright disk on a gray microscope background.",
           "A microscope phase image of one floating cell.")),
    Entry("retina.jpg", "science", "retina", None,
          "Fundus photograph of a normal left eye",
          "Wikimedia Commons, Fundus_photograph_of_normal_left_eye.jpg (Mikael Häggström)", "CC0",
          ("A photograph of the back of a human eye, showing the retina and its blood vessels.",
           "An orange retina with branching red vessels and a bright optic disc on the left.",
           "A circular fundus photo on a black background.")),
    Entry("optic_disc.jpg", "science", "retina", (46, 434, 446, 834),
          "Crop of retina: the optic disc",
          "Wikimedia Commons, Fundus_photograph_of_normal_left_eye.jpg (Mikael Häggström)", "CC0",
          ("A close-up of the optic disc of a human retina, where the blood vessels meet.",
           "Red blood vessels branching out from a pale yellow spot on an orange retina.")),
    Entry("microaneurysms.jpg", "science", "microaneurysms", None,
          "Green channel of a retina image with two microaneurysms (grayscale)",
          "High-Resolution Fundus (HRF) Image Database, image 07_dr (Andreas Maier)", "CC0 (Andreas Maier)",
          ("A gray close-up of retinal blood vessels with two small dark spots.",
           "A blurry black and white detail of a retina showing thin vessels.")),
]


def _source_array(source: str) -> np.ndarray:
    if source.startswith("matplotlib"):
        import matplotlib.cbook

        with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as handle:
            return np.asarray(Image.open(handle).convert("RGB"))
    import skimage.data

    array = getattr(skimage.data, source)()
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255  # the horse is False (black) on True (white)
    return array


def build_image(entry: Entry) -> None:
    image = Image.fromarray(_source_array(entry.source)).convert("RGB")
    if entry.crop is not None:
        image = image.crop(entry.crop)
    image.thumbnail((LONG_SIDE, LONG_SIDE), Image.Resampling.LANCZOS)
    target = HERE / entry.file
    if target.suffix == ".png":
        image.save(target, optimize=True)
    else:
        image.save(target, quality=JPEG_QUALITY, optimize=True)


def write_manifest() -> None:
    with (HERE / "manifest.csv").open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "caption", "subject"])
        for entry in ENTRIES:
            for caption in entry.captions:
                writer.writerow([entry.file, caption, entry.subject])


README_HEAD = """# Demo images

{n_images} small images with {n_captions} captions, for `mmono demo`, the examples and the tests.
`manifest.csv` has one row per caption: `image` (path relative to this folder), `caption`
(written for this project) and `subject` (person, animal, object, scene, text, texture,
science). Images are at most {long_side} px on the long side; `build_demo.py` rebuilds
everything here from copies that ship inside the scikit-image and matplotlib wheels.

Every image is public domain or CC0, as stated in the docstring of the scikit-image
function named in the table (or, for `grace_hopper.jpg`, as a work of the US federal
government). A "crop of" entry is a cut-out of the named image, under the same terms.
`horse.png` is a drawing; all others are photographs or scientific images.

| file | content | source | licence |
|---|---|---|---|
"""


README_TAIL = """
Some candidates are left out on purpose:
- `coins` and `immunohistochemistry`: scikit-image states only "no known copyright restrictions".
- `moon`, `page` and `stereo_motorcycle`: scikit-image states no licence.
- scikit-learn's `china.jpg` and `flower.jpg`: CC BY 2.0, which requires attribution.
- images that scikit-image downloads on first use, because the build runs offline.
"""


def write_readme() -> None:
    lines = []
    for entry in ENTRIES:
        where = entry.source if entry.source.startswith("matplotlib") else f"`skimage.data.{entry.source}()`"
        lines.append(f"| {entry.file} | {entry.content} | {where}; original: {entry.origin} | {entry.licence} |")
    head = README_HEAD.format(
        n_images=len(ENTRIES),
        n_captions=sum(len(entry.captions) for entry in ENTRIES),
        long_side=LONG_SIDE,
    )
    (HERE / "README.md").write_text(head + "\n".join(lines) + "\n" + README_TAIL, encoding="utf-8")


def main() -> None:
    for entry in ENTRIES:
        build_image(entry)
    write_manifest()
    write_readme()
    total = sum(path.stat().st_size for path in HERE.iterdir() if path.is_file())
    print(f"{len(ENTRIES)} images, folder size {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
