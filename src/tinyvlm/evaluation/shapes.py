"""The shapes dataset of the demo (`tinyvlm.demo`): one shape (circle / square / triangle) of one colour
(red / green / blue / yellow) in one quadrant of a 64x64 picture, with questions about its colour, shape or
position and one- or two-word answers (`make_shapes_dataset`); and the same pictures as multiple-choice
questions, in MMStar's schema and in tinyvlm's training format: an offline benchmark to try
``tinyvlm eval --task mmstar`` on, and data to fine-tune for it.

Each question of the shapes dataset (colour, shape or position) becomes a 4-option question written as
MMStar writes them, the options inline after the question::

    What colour is the shape?
    Options: A: blue, B: red, C: yellow, D: green

and the answer is the letter. Shape questions get a fourth option that never is the answer ("star"), so a
model that cannot see still scores `CHANCE` at best (1/4, 1/3, 1/4). Categories use MMStar's
own names: colour is ``instance reasoning / single-instance reasoning``, shape ``fine-grained perception /
recognition``, position ``fine-grained perception / localization``.
"""

from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from tinyvlm.evaluation.tasks import MMStar

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (235, 200, 30)}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
QUESTIONS = {
    "colour": ("What colour is the shape?", "Which colour is it?", "What is the colour of the object?"),
    "shape": ("What shape is this?", "Which shape do you see?", "What kind of shape is in the picture?"),
    "position": ("Where is the shape?", "In which corner is the shape?", "Where is the object?"),
}
ANSWERS = {"colour": tuple(COLOURS), "shape": SHAPES, "position": POSITIONS}
#: Accuracy of the best blind guess: uniform answers, question types in equal proportion.
CHANCE = sum(1 / len(ANSWERS[kind]) for kind in QUESTIONS) / len(QUESTIONS)


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    position: str


def draw_scene(scene: Scene, rng: random.Random, size: int = 64) -> Image.Image:
    """The shape of ``scene`` inside its quadrant, with a random size and offset, on a light, randomly tinted background."""
    background = tuple(rng.randint(225, 255) for _ in range(3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    half = size // 2
    extent = rng.randint(size // 4, size * 7 // 16)  # side of the shape's bounding box: 16-28 px at 64
    row, column = POSITIONS.index(scene.position) // 2, POSITIONS.index(scene.position) % 2
    left = column * half + rng.randint(1, half - extent - 1)
    top = row * half + rng.randint(1, half - extent - 1)
    box = (left, top, left + extent, top + extent)
    fill = tuple(min(255, max(0, c + rng.randint(-25, 25))) for c in COLOURS[scene.colour])
    if scene.shape == "circle":
        draw.ellipse(box, fill=fill)
    elif scene.shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(left + extent / 2, top), (left, top + extent), (left + extent, top + extent)], fill=fill)
    return image


def make_shapes_dataset(folder: str | Path, *, count: int, seed: int = 0, size: int = 64) -> Path:
    """Write ``count`` images and a ``data.jsonl`` (messages style, one question per image) under ``folder``.
    Deterministic in ``seed``. Question types cycle so that each is a third of the data."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    kinds = tuple(QUESTIONS)
    lines = []
    for i in range(count):
        scene = Scene(rng.choice(tuple(COLOURS)), rng.choice(SHAPES), rng.choice(POSITIONS))
        name = f"images/{i:05d}.png"
        draw_scene(scene, rng, size).save(folder / name)
        kind = kinds[i % len(kinds)]
        answer = {"colour": scene.colour, "shape": scene.shape, "position": scene.position}[kind]
        messages = [
            {"role": "user", "content": "<image>" + rng.choice(QUESTIONS[kind])},
            {"role": "assistant", "content": answer},
        ]
        lines.append(json.dumps({"images": [name], "messages": messages}))
    path = folder / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


# ------------------------------------------------------------------------------------- multiple choice

LETTERS = ("A", "B", "C", "D")
#: The fourth option of shape questions (never drawn).
DISTRACTOR_SHAPE = "star"
CATEGORIES = {
    "colour": ("instance reasoning", "single-instance reasoning"),
    "shape": ("fine-grained perception", "recognition"),
    "position": ("fine-grained perception", "localization"),
}


@dataclass(frozen=True)
class ChoiceQuestion:
    image: Image.Image
    question: str  # with its options, as MMStar writes them
    answer: str  # the letter
    kind: str  # colour / shape / position


def choice_questions(count: int, *, seed: int, size: int = 64) -> list[ChoiceQuestion]:
    """``count`` questions (kinds cycling, options shuffled), deterministic in ``seed``."""
    rng = random.Random(seed)
    kinds = tuple(QUESTIONS)
    questions = []
    for i in range(count):
        scene = Scene(rng.choice(tuple(COLOURS)), rng.choice(SHAPES), rng.choice(POSITIONS))
        image = draw_scene(scene, rng, size)
        kind = kinds[i % len(kinds)]
        truth = {"colour": scene.colour, "shape": scene.shape, "position": scene.position}[kind]
        options = list(ANSWERS[kind]) + ([DISTRACTOR_SHAPE] if kind == "shape" else [])
        rng.shuffle(options)
        listed = ", ".join(f"{letter}: {option}" for letter, option in zip(LETTERS, options))
        question = f"{rng.choice(QUESTIONS[kind])}\nOptions: {listed}"
        questions.append(ChoiceQuestion(image, question, LETTERS[options.index(truth)], kind))
    return questions


def write_mmstar_parquet(path: str | Path, questions: list[ChoiceQuestion]) -> Path:
    """The questions as one parquet file with MMStar's columns and ``datasets`` features (``index``,
    ``question``, ``image``, ``answer``, ``category``, ``l2_category``, ``meta_info``), as the Hub stores it."""
    import datasets

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    features = datasets.Features({
        "index": datasets.Value("int64"),
        "question": datasets.Value("string"),
        "image": datasets.Image(),
        "answer": datasets.Value("string"),
        "category": datasets.Value("string"),
        "l2_category": datasets.Value("string"),
        "meta_info": {"source": datasets.Value("string"), "split": datasets.Value("string"),
                      "image_path": datasets.Value("string")},
    })  # fmt: skip
    rows = {name: [] for name in features}
    for index, question in enumerate(questions):
        encoded = io.BytesIO()
        question.image.save(encoded, format="PNG")
        category, l2_category = CATEGORIES[question.kind]
        rows["index"].append(index)
        rows["question"].append(question.question)
        rows["image"].append({"bytes": encoded.getvalue(), "path": f"{index}.png"})
        rows["answer"].append(question.answer)
        rows["category"].append(category)
        rows["l2_category"].append(l2_category)
        rows["meta_info"].append({"source": "tinyvlm-shapes", "split": "val", "image_path": f"images/{index}.png"})
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(path))
    return path


def write_choice_records(folder: str | Path, questions: list[ChoiceQuestion]) -> Path:
    """The questions as training records (``data.jsonl`` + ``images/``, messages style): the question with
    MMStar's post-prompt, answered by the letter."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for index, question in enumerate(questions):
        name = f"images/{index:05d}.png"
        question.image.save(folder / name)
        messages = [{"role": "user", "content": question.question + MMStar.post_prompt},
                    {"role": "assistant", "content": question.answer}]
        lines.append(json.dumps({"images": [name], "messages": messages}))
    path = folder / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def write_training_data(folder: str | Path, *, count: int, seed: int) -> Path:
    """``count`` free-form shapes records (`make_shapes_dataset`) and ``count`` multiple-choice ones,
    alternating, in ``folder/data.jsonl`` (images under ``folder/free`` and ``folder/choice``)."""
    folder = Path(folder)
    free = make_shapes_dataset(folder / "free", count=count, seed=seed)
    choice = write_choice_records(folder / "choice", choice_questions(count, seed=seed + 1))
    parts = []
    for path in (free, choice):
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        for record in records:
            record["images"] = [f"{path.parent.name}/{image}" for image in record["images"]]
        parts.append(records)
    lines = [json.dumps(record) for pair in zip(*parts) for record in pair]
    path = folder / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path
