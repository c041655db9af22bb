"""The toy visual question task: coloured shapes on grey clutter, one-word answers, all from a seed.

An image is ``IMAGE_SIZE x IMAGE_SIZE`` pixels on a ``GRID x GRID`` grid of ``PATCH``-pixel cells (one
ViT patch per cell). A noisy grey background carries 4-12 grey *clutter* shapes and 3-8 coloured
*objects*, each inside its own cell (a 6-pixel shape at a random offset), so every object is exactly one
patch token: a reduced token set either keeps an object or loses it. With up to 8 objects on 64 patches,
budgets of 4-8 tokens cannot keep every object, so even a perfect rule loses accuracy there.

Questions (token sequences over :data:`VOCAB`, answered by one word; the answer is predicted at the
question's last token, which names the object asked about, so one attention hop can fetch it):

* ``colour``:  ``colour <shape>``          → a colour (the shape appears once among the objects);
* ``shape``:   ``shape <colour>``          → a shape (the colour appears once);
* ``exists``:  ``exists <colour> <shape>`` → yes / no (half each; a "no" pair shares its colour or its
  shape with an object when it can, so colour or shape presence alone does not answer it);
* ``above``:   ``above <colour> <colour>`` → a colour: which of the two objects is in the higher row
  (both colours appear once, in different rows; either may be named first). Rows are read in row-major
  patch order, so the answer is the colour whose token comes *first in the sequence*: a model can answer
  by letting each object token note the colours before it (causal attention) and reading the two
  objects' notes, with no yes / no comparison on top.

Everything is a pure function of a ``numpy.random.Generator``: :func:`make_batch` with the same seed
gives the same images and questions on every machine.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "ANSWERS",
    "COLOURS",
    "GRID",
    "IMAGE_SIZE",
    "PATCH",
    "QUESTION_TYPES",
    "SHAPES",
    "VOCAB",
    "Batch",
    "Scene",
    "encode",
    "make_batch",
    "render",
    "sample_questions",
    "sample_scene",
]

IMAGE_SIZE = 64
PATCH = 8
GRID = IMAGE_SIZE // PATCH  # 8 x 8 = 64 patches
SHAPE_SIZE = 6

COLOURS = ("red", "green", "blue", "yellow", "magenta", "cyan")
_RGB = np.array(
    [[1.0, 0.1, 0.1], [0.1, 0.85, 0.1], [0.15, 0.3, 1.0], [1.0, 0.95, 0.1], [0.95, 0.1, 0.95], [0.1, 0.95, 0.95]],
    dtype=np.float32,
)


def _masks() -> dict[str, np.ndarray]:
    n = SHAPE_SIZE
    square = np.ones((n, n), bool)
    ring = square.copy()
    ring[1:-1, 1:-1] = False
    cross = np.zeros((n, n), bool)
    cross[2:4, :] = cross[:, 2:4] = True
    rows, cols = np.mgrid[:n, :n]
    triangle = np.abs(cols - (n - 1) / 2) <= (rows + 1) / 2  # apex up
    return {"square": square, "ring": ring, "cross": cross, "triangle": triangle}


_MASKS = _masks()
SHAPES = tuple(_MASKS)
QUESTION_TYPES = ("colour", "shape", "exists", "above")

_WORDS = ("colour", "shape", "exists", "above")
ANSWERS = COLOURS + SHAPES + ("yes", "no")
#: token 0 pads, token 1 is the image placeholder, then the words; ``colour`` and the shape names double
#: as question words and answers.
VOCAB = ("<pad>", "<image>") + tuple(dict.fromkeys(_WORDS + ANSWERS))
_ID = {w: i for i, w in enumerate(VOCAB)}
PAD_ID, IMAGE_ID = 0, 1


@dataclass(frozen=True)
class Scene:
    """One image's contents: per object its cell ``(row, col)``, colour and shape index."""

    cells: tuple[tuple[int, int], ...]
    colours: tuple[int, ...]
    shapes: tuple[int, ...]
    clutter: tuple[tuple[int, int, int, float], ...]  # (row, col, shape, grey level)
    offsets: tuple[tuple[int, int], ...]  # pixel offset of every object, then every clutter shape
    background: float
    noise_seed: int


def sample_scene(rng: np.random.Generator, *, max_objects: int = 8) -> Scene:
    """3 to ``max_objects`` (at most 8) coloured objects and 4-12 grey clutter shapes in distinct cells."""
    if not 3 <= max_objects <= 8:
        raise ValueError(f"max_objects must be in [3, 8], got {max_objects}")
    n_obj, n_clutter = int(rng.integers(3, max_objects + 1)), int(rng.integers(4, 13))
    cells = rng.permutation(GRID * GRID)[: n_obj + n_clutter]
    background = float(rng.uniform(0.35, 0.65))
    clutter = []
    for c in cells[n_obj:]:
        grey = background + float(rng.choice([-1, 1]) * rng.uniform(0.2, 0.35))
        clutter.append((int(c) // GRID, int(c) % GRID, int(rng.integers(len(SHAPES))), grey))
    return Scene(
        cells=tuple((int(c) // GRID, int(c) % GRID) for c in cells[:n_obj]),
        colours=tuple(int(x) for x in rng.integers(len(COLOURS), size=n_obj)),
        shapes=tuple(int(x) for x in rng.integers(len(SHAPES), size=n_obj)),
        clutter=tuple(clutter),
        offsets=tuple((int(a), int(b)) for a, b in rng.integers(0, PATCH - SHAPE_SIZE + 1, size=(len(cells), 2))),
        background=background,
        noise_seed=int(rng.integers(2**31)),
    )


def render(scene: Scene) -> np.ndarray:
    """The scene as a float32 ``(3, IMAGE_SIZE, IMAGE_SIZE)`` image in [0, 1]."""
    noise = np.random.default_rng(scene.noise_seed).normal(0.0, 0.05, (IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32)
    image = np.repeat((scene.background + noise)[None], 3, axis=0)
    items = [(r, c, s, _RGB[k]) for (r, c), k, s in zip(scene.cells, scene.colours, scene.shapes)]
    items += [(r, c, s, np.full(3, g, np.float32)) for r, c, s, g in scene.clutter]
    for (row, col, shape, rgb), (dy, dx) in zip(items, scene.offsets):
        y, x = row * PATCH + dy, col * PATCH + dx
        mask = _MASKS[SHAPES[shape]]
        patch = image[:, y : y + SHAPE_SIZE, x : x + SHAPE_SIZE]
        patch[:, mask] = rgb[:, None]
    return np.clip(image, 0.0, 1.0)


def _unique(values: tuple[int, ...]) -> list[int]:
    """Positions whose value appears once."""
    return [i for i, v in enumerate(values) if values.count(v) == 1]


def _question(scene: Scene, kind: str, rng: np.random.Generator) -> tuple[list[str], str] | None:
    """One question of ``kind`` about ``scene`` and its answer, or None when the scene has none."""
    colours, shapes = scene.colours, scene.shapes
    if kind == "colour":
        pick = _unique(shapes)
        if not pick:
            return None
        i = int(rng.choice(pick))
        return ["colour", SHAPES[shapes[i]]], COLOURS[colours[i]]
    if kind == "shape":
        pick = _unique(colours)
        if not pick:
            return None
        i = int(rng.choice(pick))
        return ["shape", COLOURS[colours[i]]], SHAPES[shapes[i]]
    if kind == "exists":
        present = set(zip(colours, shapes))
        if rng.random() < 0.5:
            c, s = list(present)[int(rng.integers(len(present)))]
            answer = "yes"
        else:
            near = [
                (c, s)
                for c in range(len(COLOURS))
                for s in range(len(SHAPES))
                if (c, s) not in present and (c in colours or s in shapes)
            ]
            if not near:
                return None
            c, s = near[int(rng.integers(len(near)))]
            answer = "no"
        return ["exists", COLOURS[c], SHAPES[s]], answer
    if kind == "above":
        pick = _unique(colours)
        pairs = [(i, j) for i in pick for j in pick if scene.cells[i][0] != scene.cells[j][0]]
        if not pairs:
            return None
        i, j = pairs[int(rng.integers(len(pairs)))]
        higher = i if scene.cells[i][0] < scene.cells[j][0] else j
        return ["above", COLOURS[colours[i]], COLOURS[colours[j]]], COLOURS[colours[higher]]
    raise ValueError(f"kind must be one of {QUESTION_TYPES}, got {kind!r}")


def sample_questions(
    scene: Scene, rng: np.random.Generator, count: int, *, weights: tuple[float, ...] | None = None
) -> list[tuple[str, list[str], str]]:
    """``count`` questions ``(type, words, answer)`` about ``scene``, types drawn uniformly (or with
    probabilities ``weights``, one per :data:`QUESTION_TYPES`) among those it has, no question twice while
    new ones can be found (a repeat could be answered from the context)."""
    if weights is not None and (len(weights) != len(QUESTION_TYPES) or min(weights) < 0 or sum(weights) <= 0):
        raise ValueError(f"weights must be {len(QUESTION_TYPES)} non-negative numbers, not all 0, got {weights}")
    p = None if weights is None else np.asarray(weights, dtype=np.float64) / sum(weights)
    out: list[tuple[str, list[str], str]] = []
    seen: set[tuple[str, ...]] = set()
    attempts = 0
    while len(out) < count:
        kind = QUESTION_TYPES[int(rng.integers(len(QUESTION_TYPES))) if p is None else int(rng.choice(len(p), p=p))]
        qa = _question(scene, kind, rng)
        attempts += 1
        if not out and attempts > 1000:
            raise ValueError(f"weights must allow a question this scene has, got {weights}")
        if qa is not None and (tuple(qa[0]) not in seen or attempts > 20 * count):
            seen.add(tuple(qa[0]))
            out.append((kind, *qa))
    return out


def encode(words: list[str]) -> list[int]:
    """Token ids of ``words``."""
    return [_ID[w] for w in words]


@dataclass
class Batch:
    """A batch of images with their questions.

    ``pixel_values`` ``(B, 3, H, W)`` normalised images; ``input_ids`` ``(B, L)`` the questions and
    answers after the image (right-padded with ``PAD_ID``); ``labels`` ``(B, L)`` the answer ids at the
    positions that predict them (the last token of each question), -100 elsewhere;
    ``kinds`` the question type per question and sample; ``answers`` the answer id per question
    (single-question batches: ``(B,)``); ``patch_colour`` / ``patch_shape`` ``(B, P)`` the colour / shape
    class of each patch (0 = none, else index + 1), ``cls_targets`` ``(B, len(COLOURS) * len(SHAPES))``
    which colour-shape pairs are present.
    """

    pixel_values: torch.Tensor
    input_ids: torch.Tensor
    labels: torch.Tensor
    kinds: list[list[str]]
    answers: torch.Tensor
    patch_colour: torch.Tensor
    patch_shape: torch.Tensor
    cls_targets: torch.Tensor


MEAN, STD = 0.5, 0.25


def make_batch(
    rng: np.random.Generator,
    batch_size: int,
    *,
    questions: int = 1,
    weights: tuple[float, ...] | None = None,
    max_objects: int = 8,
) -> Batch:
    """``batch_size`` scenes (3 to ``max_objects`` objects), each with ``questions`` question-answer pairs
    one after another, types drawn with ``weights`` (see :func:`sample_questions`; default uniform)."""
    images, rows, kinds, answers = [], [], [], []
    colour = torch.zeros(batch_size, GRID * GRID, dtype=torch.long)
    shape = torch.zeros_like(colour)
    cls_targets = torch.zeros(batch_size, len(COLOURS) * len(SHAPES))
    for b in range(batch_size):
        scene = sample_scene(rng, max_objects=max_objects)
        images.append(render(scene))
        for (r, c), k, s in zip(scene.cells, scene.colours, scene.shapes):
            colour[b, r * GRID + c], shape[b, r * GRID + c] = k + 1, s + 1
            cls_targets[b, k * len(SHAPES) + s] = 1.0
        ids, labels, ks, ans = [], [], [], []
        for kind, words, answer in sample_questions(scene, rng, questions, weights=weights):
            ids += encode(words)
            labels += [-100] * (len(words) - 1) + [_ID[answer]]
            ids.append(_ID[answer])
            labels.append(-100)
            ks.append(kind)
            ans.append(_ID[answer])
        rows.append((ids, labels))
        kinds.append(ks)
        answers.append(ans)
    length = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((batch_size, length), PAD_ID, dtype=torch.long)
    label_ids = torch.full((batch_size, length), -100, dtype=torch.long)
    for b, (ids, lab) in enumerate(rows):
        input_ids[b, : len(ids)] = torch.tensor(ids)
        label_ids[b, : len(lab)] = torch.tensor(lab)
    pixels = (torch.from_numpy(np.stack(images)) - MEAN) / STD
    answer_ids = torch.tensor(answers)
    return Batch(
        pixels,
        input_ids,
        label_ids,
        kinds,
        answer_ids.squeeze(1) if questions == 1 else answer_ids,
        colour,
        shape,
        cls_targets,
    )
