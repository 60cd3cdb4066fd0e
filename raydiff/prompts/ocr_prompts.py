"""The packaged OCR prompt sets (`ocr_train.txt`, `ocr_test.txt`): templates × phrases, seeded.

Text written for raydiff (CC0-1.0, LICENSES/raydiff-ocr.txt). Each prompt names a scene and one
short text in double quotes, which is what the `ocr` reward reads back. Train and test use
disjoint phrases, so test scores measure rendering unseen text. Regenerate with
`python -m raydiff.prompts.ocr_prompts` (a test checks the shipped files equal this output).
"""

from __future__ import annotations

import random
from pathlib import Path

TEMPLATES = (
    'A wooden sign by a country road that says "{t}"',
    'A neon sign in a rainy city window reading "{t}"',
    'A chalkboard menu outside a small cafe with the words "{t}"',
    'A birthday cake with "{t}" written in blue icing',
    'A vintage travel poster with the title "{t}" in bold letters',
    'A coffee mug on a desk printed with "{t}"',
    'A white t-shirt on a hanger with "{t}" printed on the front',
    'A street mural on a brick wall spelling "{t}"',
    'A book cover on a library table titled "{t}"',
    'A handwritten note on yellow paper that says "{t}"',
    'A storefront awning with the shop name "{t}"',
    'A glowing billboard above a highway showing "{t}"',
    'A sandy beach with "{t}" written in the sand',
    'A red and white road sign reading "{t}"',
    'A cardboard box stamped with "{t}" in black ink',
    'A cinema marquee at night announcing "{t}"',
    'A laptop screen displaying the words "{t}"',
    'A hot air balloon with "{t}" painted on its side',
    'A vintage label on a glass jar that reads "{t}"',
    'A cat sitting next to a small sign that says "{t}"',
    'A dog holding a placard with "{t}" written on it',
    'A spaceship hull with "{t}" stencilled in white paint',
    'Fireworks over a city skyline spelling "{t}"',
    'A knitted sweater with the word pattern "{t}"',
    'An old typewriter page with "{t}" typed at the top',
)

TRAIN_PHRASES = (
    "OPEN", "CLOSED", "WELCOME", "FRESH BREAD", "HELLO WORLD", "GOOD MORNING", "STAY CURIOUS", "EXIT",
    "NO PARKING", "SALE", "HOT COFFEE", "THANK YOU", "BE KIND", "DREAM BIG", "HOME SWEET HOME", "LIBRARY",
    "BAKERY", "SLOW DOWN", "FOLLOW ME", "TEA TIME", "NORTH", "GARDEN", "MOONLIGHT", "RIVERSIDE",
    "HAPPY BIRTHDAY", "KEEP OUT", "PIZZA", "BOOKS", "FRAGILE", "ADVENTURE", "SUMMER 2025", "PLANET EARTH",
    "MUSIC", "JAZZ NIGHT", "LEMONADE", "RAYDIFF", "SPRING", "OCEAN VIEW", "CAMPFIRE", "HARBOR",
)
TEST_PHRASES = (
    "GOOD LUCK", "QUIET PLEASE", "SUNRISE", "MARKET", "STARLIGHT", "RUN FAST", "FLOWERS", "MOUNTAIN PASS",
    "DINER", "LOST AND FOUND", "WINTER", "ROBOTS", "PAPER MOON", "GAME ON", "FARM STAND", "NIGHT OWL",
)


def build(phrases, n: int, seed: int) -> list[str]:
    """`n` distinct template/phrase pairs, in a seeded random order."""
    pairs = [(t, p) for t in TEMPLATES for p in phrases]
    random.Random(seed).shuffle(pairs)
    return [t.format(t=p) for t, p in pairs[:n]]


def prompt_sets() -> dict[str, list[str]]:
    return {"ocr_train.txt": build(TRAIN_PHRASES, 800, seed=0), "ocr_test.txt": build(TEST_PHRASES, 100, seed=1)}


def write(folder: Path | None = None) -> None:
    folder = folder or Path(__file__).parent
    for name, prompts in prompt_sets().items():
        (folder / name).write_text("\n".join(prompts) + "\n")


if __name__ == "__main__":
    write()
