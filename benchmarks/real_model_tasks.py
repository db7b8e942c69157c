"""The two small tasks of benchmarks/real_models.py, written as JSONL files at run time.

- topic: classification of one-sentence texts into `space` or `sports`, scored through label
  words of several words (" outer space", " team sports" after " Topic:"), so every label
  is several tokens under any tokenizer; the benchmark checks that it is for each model.
- capitals: prompt/completion, "Q: What is the capital of X?\nA:" -> " The capital of X is
  Y.", with a held-out file of other countries for the completion loss before and after.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

TOPIC_LABELS = ("space", "sports")
TOPIC_LABEL_WORDS = ("outer space", "team sports")
TOPIC_SUFFIX = " Topic:"

SPACE = (
    "The probe sent back sharp images of the rings around Saturn.",
    "Astronauts on the station grew lettuce in a sealed chamber.",
    "A new telescope spotted a faint galaxy near the edge of the visible universe.",
    "The rocket's second stage burned for six minutes before orbit.",
    "Mars rovers drill into rocks to look for signs of ancient water.",
    "A comet will pass close enough to see without binoculars next spring.",
    "The lunar lander touched down near the moon's south pole.",
    "Solar flares can disturb satellites and radio signals on Earth.",
    "Engineers tested the heat shield that protects the capsule on reentry.",
    "Astronomers measured the wobble of a star to find a planet orbiting it.",
    "The space agency chose four crew members for the next mission.",
    "Jupiter's great red spot is a storm larger than our planet.",
    "A meteor shower lit up the night sky over the desert.",
    "The spacewalk lasted seven hours while the crew replaced a battery.",
    "Dark matter does not emit light but bends it through gravity.",
    "The satellite mapped the ice sheets from a polar orbit.",
)
SPORTS = (
    "The striker scored twice in the second half to win the cup.",
    "The point guard handed out twelve assists in the final game.",
    "Rain delayed the cricket match until the late afternoon.",
    "The coach benched two starters after a poor first quarter.",
    "Fans filled the stadium for the derby between the rival clubs.",
    "The goalkeeper saved a penalty in the last minute of extra time.",
    "The relay team broke the national record by half a second.",
    "Their pitcher struck out nine batters in six innings.",
    "The rugby side lost their captain to an injury in the first scrum.",
    "A late three-pointer sent the game into overtime.",
    "The volleyball team won the deciding set after trailing badly.",
    "The club signed a young midfielder from a second-division team.",
    "The hockey players traded punches before the referee stepped in.",
    "The referee awarded a free kick just outside the box.",
    "The home team clinched the league title with two games left.",
    "The quarterback threw for three touchdowns in the snow.",
)

CAPITALS_TRAIN = (
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Portugal", "Lisbon"), ("Austria", "Vienna"), ("Greece", "Athens"), ("Poland", "Warsaw"),
    ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Finland", "Helsinki"), ("Ireland", "Dublin"),
    ("Japan", "Tokyo"), ("China", "Beijing"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"),
    ("Peru", "Lima"), ("Chile", "Santiago"), ("Canada", "Ottawa"), ("Mexico", "Mexico City"),
    ("Russia", "Moscow"), ("Turkey", "Ankara"), ("India", "New Delhi"), ("Cuba", "Havana"),
)
CAPITALS_HELDOUT = (
    ("Denmark", "Copenhagen"), ("Hungary", "Budapest"), ("Belgium", "Brussels"),
    ("Thailand", "Bangkok"), ("Argentina", "Buenos Aires"), ("Australia", "Canberra"),
    ("Brazil", "Brasilia"), ("Morocco", "Rabat"), ("Vietnam", "Hanoi"),
    ("Colombia", "Bogota"), ("Iceland", "Reykjavik"), ("Nigeria", "Abuja"),
)


@dataclass(frozen=True)
class TaskFiles:
    topic_train: Path
    capitals_train: Path
    capitals_heldout: Path


def _capital_example(country: str, capital: str) -> dict[str, str]:
    return {"prompt": f"Q: What is the capital of {country}?\nA:",
            "completion": f" The capital of {country} is {capital}."}


def _write_jsonl(path: Path, records: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def write_task_files(directory: Path) -> TaskFiles:
    """The three JSONL files under `directory`; the topic texts alternate by label."""
    directory.mkdir(parents=True, exist_ok=True)
    topic = [{"text": t, "label": label}
             for pair in zip(SPACE, SPORTS, strict=True)
             for t, label in zip(pair, TOPIC_LABELS, strict=True)]
    return TaskFiles(
        topic_train=_write_jsonl(directory / "topic_train.jsonl", topic),
        capitals_train=_write_jsonl(directory / "capitals_train.jsonl",
                                    [_capital_example(*p) for p in CAPITALS_TRAIN]),
        capitals_heldout=_write_jsonl(directory / "capitals_heldout.jsonl",
                                      [_capital_example(*p) for p in CAPITALS_HELDOUT]),
    )
