"""Label text for IMU-text alignment (issue 10, "Label text").

Datasets name the same activity in different spellings (``WALKING_UPSTAIRS``, ``Walking-Upstairs``,
UCI HAR's ``LAYING``). ``activity_text`` turns a label name into one canonical text, and labels of two
datasets are the same label exactly when their canonical texts are equal: labels are matched by text,
never by id. ``describe_activity`` turns a label into several natural-language descriptions, templates
times synonyms, for a frozen sentence encoder; zero-shot transfer to activities unseen in training rests
on these texts saying what the body does, so the synonyms describe posture and motion in plain words.
"""

from __future__ import annotations

import re

# Spellings of one activity, keyed and valued by normalized text. Only true respellings belong here:
# activities a dataset names apart (``ascending stairs`` vs ``walking upstairs``, ``lying`` vs the
# movement ``lying down``) stay apart, since merging them would decide a label question for the data.
ALIASES: dict[str, str] = {
    "laying": "lying",  # UCI HAR
    "lie": "lying",
    "sit": "sitting",
    "stand": "standing",
    "walk": "walking",
    "run": "running",
    "jog": "jogging",
    "bike": "cycling",
    "biking": "cycling",
    "bicycling": "cycling",
    "stairsup": "walking upstairs",  # HHAR
    "stairsdown": "walking downstairs",  # HHAR
    "jumping rope": "rope jumping",
    "vacuuming": "vacuum cleaning",
}

# Sentence frames for a gerund or participle phrase ("walking up a staircase", "seated").
TEMPLATES: tuple[str, ...] = (
    "{}",
    "a person {}",
    "someone is {}",
    "a person is {}",
    "the subject is {}",
    "motion sensor recording of a person {}",
    "wearable sensor data while {}",
    "an accelerometer worn by someone {}",
)

# Plain descriptions of activities common in HAR datasets beside their canonical text, the key. No phrase
# belongs to two activities, so a description names one label.
SYNONYMS: dict[str, tuple[str, ...]] = {
    "walking": ("walking on flat ground", "strolling along", "walking at a normal pace"),
    "walking upstairs": ("climbing the stairs", "walking up a staircase",
                         "going up the stairs step by step"),
    "walking downstairs": ("going down the stairs", "walking down a staircase",
                           "stepping down the stairs one at a time"),
    "sitting": ("sitting on a chair", "seated", "sitting still"),
    "standing": ("standing upright", "standing still", "upright and motionless on both feet"),
    "lying": ("lying flat on a bed", "lying on the back", "reclining horizontally",
              "resting horizontally without moving"),
    "running": ("running fast", "sprinting", "running at a quick pace"),
    "jogging": ("jogging at an easy pace", "running slowly", "running at a relaxed steady pace"),
    "cycling": ("riding a bicycle", "pedaling a bike", "biking along a road"),
    "ascending stairs": ("climbing up a flight of stairs", "going up a staircase",
                         "stepping upward on stairs"),
    "descending stairs": ("coming down a flight of stairs", "going down a staircase",
                          "stepping downward on stairs"),
    "nordic walking": ("walking with trekking poles", "walking with nordic poles",
                       "fitness walking while swinging two poles"),
    "ironing": ("ironing clothes", "pressing a shirt with an iron", "standing at an ironing board"),
    "vacuum cleaning": ("vacuuming the floor", "cleaning the floor with a vacuum cleaner",
                        "pushing a vacuum cleaner back and forth"),
    "rope jumping": ("jumping rope", "skipping rope", "jumping over a swinging rope"),
    "jumping": ("jumping up and down", "hopping in place", "leaping off the ground"),
    "falling": ("falling to the ground", "losing balance and falling over", "tripping and falling"),
    "lying down": ("lying down on a bed", "going from sitting to lying",
                   "lowering the body onto a bed"),
    "sitting down": ("taking a seat", "lowering oneself onto a chair",
                     "going from standing to sitting"),
    "standing up": ("getting up from a chair", "rising to stand",
                    "going from sitting to standing"),
    "writing": ("writing with a pen", "writing on paper by hand", "handwriting notes"),
    "typing": ("typing on a keyboard", "typing on a computer", "typing text on a laptop"),
    "eating": ("eating a meal", "eating food with a fork", "bringing food to the mouth"),
    "brushing teeth": ("brushing one's teeth", "cleaning teeth with a toothbrush",
                       "scrubbing the teeth with a toothbrush"),
    "drinking": ("drinking from a cup", "sipping a drink", "raising a glass to the lips"),
    "clapping": ("clapping hands", "applauding", "clapping both hands together"),
    "dribbling": ("dribbling a basketball", "bouncing a ball while moving"),
    "folding clothes": ("folding laundry", "folding a shirt"),
}

_SEPARATORS = re.compile(r"[\s_\-]+")


def activity_text(name: str) -> str:
    """The canonical text of a label name as a dataset's label file writes it (issue 10): lower case,
    runs of ``_``, ``-`` and spaces made one space, stripped, then a respelling mapped by ``ALIASES``."""
    if not isinstance(name, str):
        raise TypeError(f"activity name {name!r} is a {type(name).__name__}, not a str")
    text = _SEPARATORS.sub(" ", name.lower()).strip()
    if not text:
        raise ValueError(f"activity name {name!r} has no text")
    return ALIASES.get(text, text)


def describe_activity(name: str) -> list[str]:
    """Descriptions of an activity, templates times synonyms (issue 10): deterministic, ordered, distinct,
    the first being the canonical text. Template-major order, so the bare phrases come first. An activity
    without an entry in ``SYNONYMS`` gets every template over its canonical text only."""
    canonical = activity_text(name)
    phrases = (canonical, *SYNONYMS.get(canonical, ()))
    descriptions = (template.format(phrase) for template in TEMPLATES for phrase in phrases)
    return list(dict.fromkeys(descriptions))
