"""Procedural arithmetic word problems whose answers need a (often rare) unit or object word.

"Zebulon has 5 quills. Zebulon finds 12 more quills. How many quills does Zebulon have now?"
-> "Zebulon starts with 5 quills. 5 + 12 = 17. #### 17 quills". Names, objects and units are drawn
from long-tailed (Zipf-like) lists, so some words are rare in the training data yet the verifier
demands them: rare tokens carry reward. One fixed template keeps problems short (~30-60 tokens)
for tiny models. Problems are deterministic per (seed, split, index); the split of a problem is a
hash of its text, so train, validation and test never share a question. With ``implied_unit`` a
unit problem names only its material ("8 measures of cider") and the answer needs the material's
unit ("hogsheads"), which the question never states: rare words must be recalled, not copied.
"""

from __future__ import annotations

import hashlib
import random
import re

from tokentrust.tasks.base import Example, Task
from tokentrust.verifiers.numeric import answer_tail, first_number, numbers_equal

PROMPT = '{question}\nEnd with "#### N unit".'

# Lists run from common to rare; sampling weight of rank r is 1 / (r + 1) ** ZIPF_S.
ZIPF_S = 1.1

NAMES = """Anna Ben Mia Sam Lily Max Emma Tom Lucy Jack Sara Leo Noah Ava Eli Zoe Liam Ella Owen Ruby
Adam Nora Luke Ivy Finn Rosa Omar Maya Ivan Lena Hugo Alma Raj Iris Kofi Amir Yuki Hana Nils Ines Dev Priya
Tariq Greta Mateo Sofia Pablo Chloe Felix Clara Jonas Elsa Kai Naomi Ravi Wanda Otto Hazel Arlo Freya Silas
Mabel Jasper Edith Ezra Opal Rufus Vera Cyrus Maude Basil Ada Lionel Dora Ansel Thea Gideon Flora Cormac Isolde
Alaric Beatrix Caspian Delphine Evander Fenella Gulliver Honoria Ignatius Jocasta Lysander Mirabel Octavian
Perpetua Quentin Rosamund Sebastian Tabitha Ulysses Verity Wilhelmina Xavier Yolanda Zebulon Bartholomew
Cressida Drusilla Eustace Philippa Thaddeus Ottoline Peregrine Hortensia Leopold Marigold Barnaby Clementine
Ebenezer Griselda Horatio Leocadia Montgomery Philomena Zenobia""".split()

# (singular, plural), common to rare
OBJECTS = [tuple(w.split("/")) for w in """apple/apples book/books pencil/pencils marble/marbles cookie/cookies
sticker/stickers card/cards ball/balls flower/flowers egg/eggs orange/oranges banana/bananas shell/shells
coin/coins stamp/stamps balloon/balloons crayon/crayons candy/candies button/buttons rock/rocks leaf/leaves
box/boxes bottle/bottles hat/hats sock/socks key/keys bead/beads pear/pears plum/plums muffin/muffins
cupcake/cupcakes bracelet/bracelets kite/kites feather/feathers acorn/acorns peach/peaches cherry/cherries
lemon/lemons potato/potatoes tomato/tomatoes carrot/carrots sandwich/sandwiches doll/dolls puzzle/puzzles
robot/robots ticket/tickets envelope/envelopes magnet/magnets brush/brushes spoon/spoons plate/plates
bowl/bowls candle/candles basket/baskets bucket/buckets blanket/blankets pillow/pillows towel/towels
umbrella/umbrellas notebook/notebooks eraser/erasers marker/markers puppy/puppies kitten/kittens
chicken/chickens duck/ducks goose/geese mouse/mice rabbit/rabbits frog/frogs turtle/turtles snail/snails
lantern/lanterns compass/compasses telescope/telescopes trumpet/trumpets violin/violins drum/drums
flute/flutes kettle/kettles teapot/teapots goblet/goblets crate/crates scroll/scrolls parcel/parcels
wagon/wagons saddle/saddles anchor/anchors helmet/helmets shield/shields sword/swords arrow/arrows
quill/quills astrolabe/astrolabes sextant/sextants abacus/abacuses hourglass/hourglasses
gramophone/gramophones harpsichord/harpsichords theodolite/theodolites zither/zithers ocarina/ocarinas
lute/lutes lyre/lyres kaleidoscope/kaleidoscopes metronome/metronomes trilobite/trilobites
ammonite/ammonites geode/geodes doubloon/doubloons amulet/amulets talisman/talismans chalice/chalices
thimble/thimbles spindle/spindles bobbin/bobbins sickle/sickles trowel/trowels pestle/pestles ladle/ladles
tankard/tankards flagon/flagons carafe/carafes samovar/samovars tureen/tureens gimlet/gimlets awl/awls
sundial/sundials orrery/orreries monocle/monocles periscope/periscopes barometer/barometers
gyroscope/gyroscopes sousaphone/sousaphones bassoon/bassoons oboe/oboes mandolin/mandolins banjo/banjos
bagpipe/bagpipes cymbal/cymbals tambourine/tambourines didgeridoo/didgeridoos glockenspiel/glockenspiels
kazoo/kazoos quoit/quoits shuttlecock/shuttlecocks nautilus/nautiluses cowrie/cowries scarab/scarabs
figurine/figurines gargoyle/gargoyles obelisk/obelisks pennant/pennants gauntlet/gauntlets
vambrace/vambraces pauldron/pauldrons halberd/halberds trebuchet/trebuchets galleon/galleons
caravel/caravels dirigible/dirigibles velocipede/velocipedes palanquin/palanquins yurt/yurts
ziggurat/ziggurats""".split()]

# (singular, plural, materials): the answer word is the unit; common to rare
MEASURES = [(s, p, m.split(",")) for s, p, m in (w.split("/") for w in """liter/liters/water,milk,juice
meter/meters/rope,wire,cloth kilogram/kilograms/rice,sugar,sand gallon/gallons/paint,water,milk
ounce/ounces/gold,tea,honey inch/inches/tape,thread,wire mile/miles/road,railway,canal
yard/yards/fabric,silk,cloth pint/pints/cream,ale,milk quart/quarts/oil,soup,cider acre/acres/land,meadow,forest
gram/grams/salt,saffron,silver centimeter/centimeters/string,twine,thread bushel/bushels/wheat,oats,barley
peck/pecks/corn,beans,peas furlong/furlongs/fence,hedge,track league/leagues/coastline,river,road
cubit/cubits/rope,cedar,linen fathom/fathoms/chain,cable,line ell/ells/silk,velvet,linen dram/drams/ink,perfume,tincture
scruple/scruples/saffron,quinine,musk hogshead/hogsheads/cider,molasses,wine firkin/firkins/butter,ale,soap
gill/gills/brandy,gin,vinegar hectare/hectares/vineyard,orchard,pasture pennyweight/pennyweights/gold,silver,platinum
minim/minims/laudanum,tincture,oil pottle/pottles/wine,mead,cider""".split())]

# With `implied_unit`, a measure problem names only its material ("5 measures of molasses") and the
# answer needs the unit that material always comes in ("#### 17 hogsheads"): one material per unit,
# the first of the unit's materials that no more common unit has taken. The unit word is then
# recalled, not copied from the question. No material is an answer word.
def _implied_materials() -> dict[str, str]:
    used: set[str] = set()
    out = {}
    for sing, _, materials in MEASURES:
        material = next(m for m in materials if m not in used)
        used.add(material)
        out[sing] = material
    return out


IMPLIED_MATERIAL: dict[str, str] = _implied_materials()  # unit (singular) -> its one material
QUESTION_MEASURE = ("measure", "measures")  # the unit-less word an implied-unit question uses

# every answer word the verifier knows, lower case -> its (singular, plural)
UNIT_WORDS: dict[str, tuple[str, str]] = {}
for _s, _p in OBJECTS + [(s, p) for s, p, _ in MEASURES]:
    UNIT_WORDS[_s] = UNIT_WORDS[_p] = (_s, _p)

_ADD = ["finds", "buys", "gets", "receives", "collects", "wins"]
_SUB = ["gives away", "loses", "sells", "uses", "drops"]
_MUL = {2: "twice", 3: "three times"}
_SPLIT_BUCKET = {"test": (0,), "validation": (1,), "val": (1,), "dev": (1,)}
_TRAIN_BUCKETS = tuple(range(2, 16))
_WORD = re.compile(r"[a-z]+")


def _zipf_choice(rng: random.Random, items: list, cum: list[float]):
    return rng.choices(items, cum_weights=cum, k=1)[0]


def _cum(n: int) -> list[float]:
    out, tot = [], 0.0
    for r in range(n):
        tot += 1.0 / (r + 1) ** ZIPF_S
        out.append(tot)
    return out


_NAME_CUM, _OBJ_CUM, _MEAS_CUM = _cum(len(NAMES)), _cum(len(OBJECTS)), _cum(len(MEASURES))

# An answer word is "rare" when the words before it in its Zipf list already hold this share of the
# list's sampling mass: the tail the sampler rarely draws, so training sees it rarely too.
RARE_ANSWER_MASS = 0.8


def _tail_words(pairs: list[tuple[str, str]], cum: list[float]) -> set[str]:
    return {w for (s, p), before in zip(pairs, [0.0, *cum[:-1]]) if before >= RARE_ANSWER_MASS * cum[-1]
            for w in (s, p)}


RARE_ANSWER_WORDS = _tail_words(OBJECTS, _OBJ_CUM) | _tail_words([(s, p) for s, p, _ in MEASURES], _MEAS_CUM)


def _bucket(question: str) -> int:
    return hashlib.sha1(question.encode()).digest()[0] % 16


class Arith(Task):
    name = "arith"
    splits = None  # any split name; "train", "test" and "validation" are disjoint by construction

    def __init__(self, seed: int = 0, steps: int = 2, min_steps: int = 1, max_operand: int = 20,
                 num_train: int = 5000, num_test: int = 500, measure_frac: float = 0.25,
                 implied_unit: bool = False, answer_fallback: bool = False, format_reward: float = 0.0):
        super().__init__(format_reward=format_reward, answer_fallback=answer_fallback)
        if not 1 <= min_steps <= steps:
            raise ValueError(f"need 1 <= min_steps <= steps, got min_steps={min_steps}, steps={steps}")
        if max_operand < 2:
            raise ValueError(f"max_operand must be >= 2, got {max_operand}")
        self.seed, self.steps, self.min_steps, self.max_operand = seed, steps, min_steps, max_operand
        if not 0.0 <= measure_frac <= 1.0:
            raise ValueError(f"measure_frac must be in [0, 1], got {measure_frac}")
        self.num_train, self.num_test, self.measure_frac = num_train, num_test, measure_frac
        self.implied_unit = bool(implied_unit)

    # ------------------------------------------------------------------ generation
    def generate(self, split: str, index: int) -> Example:
        """Problem `index` of `split`: a pure function of (seed, knobs, split, index)."""
        rng = random.Random(f"arith:{self.seed}:{split}:{index}")
        buckets = _SPLIT_BUCKET.get(split, _TRAIN_BUCKETS)
        while True:
            ex = self._draw(rng, split, index)
            if _bucket(ex.question) in buckets:
                return ex

    def _draw(self, rng: random.Random, split: str, index: int) -> Example:
        name = _zipf_choice(rng, NAMES, _NAME_CUM)
        material = None
        if rng.random() < self.measure_frac:
            sing, plur, materials = _zipf_choice(rng, MEASURES, _MEAS_CUM)
            material = IMPLIED_MATERIAL[sing] if self.implied_unit else rng.choice(materials)
            tail = " of " + material
        else:
            sing, plur = _zipf_choice(rng, OBJECTS, _OBJ_CUM)
            tail = ""
        implied = self.implied_unit and material is not None
        q_sing, q_plur = QUESTION_MEASURE if implied else (sing, plur)  # the words the question uses

        def np(n: int) -> str:  # "1 quill", "5 furlongs of fence" (implied: "5 measures of molasses")
            return f"{n} {q_sing if n == 1 else q_plur}{tail}"

        value = rng.randint(1, self.max_operand)
        # the worked solution restates the start in the answer's own unit
        sents, work = [f"{name} has {np(value)}."], [f"{name} starts with {value} {sing if value == 1 else plur}{tail}."]
        ops = []
        for _ in range(rng.randint(self.min_steps, self.steps)):
            kind = rng.choices(["add", "sub", "mul"], weights=[0.45, 0.35, 0.2])[0]
            if kind == "sub" and value < 2:
                kind = "add"
            if kind == "mul" and value > self.max_operand:
                kind = "sub"
            if kind == "add":
                k = rng.randint(1, self.max_operand)
                sents.append(f"{name} {rng.choice(_ADD)} {k} more {q_sing if k == 1 else q_plur}{tail}.")
                work.append(f"{value} + {k} = {value + k}.")
                value += k
            elif kind == "sub":
                k = rng.randint(1, min(value - 1, self.max_operand))
                sents.append(f"{name} {rng.choice(_SUB)} {np(k)}.")
                work.append(f"{value} - {k} = {value - k}.")
                value -= k
            else:
                k = rng.choice([2, 3])
                sents.append(f"Now {name} has {_MUL[k]} as many {q_plur}{tail}.")
                work.append(f"{value} * {k} = {value * k}.")
                value *= k
            ops.append((kind, k))
        unit = sing if value == 1 else plur
        sents.append(f"How much {material} does {name} have now?" if implied
                     else f"How many {plur}{tail} does {name} have now?")
        work.append(f"#### {value} {unit}")
        return Example(
            id=f"arith-{split}-{index}", question=" ".join(sents), answer=f"{value} {unit}", solution=" ".join(work),
            meta={"number": value, "unit": plur, "unit_singular": sing, "name": name, "ops": ops,
                  **({"material": material, "implied_unit": True} if implied else {})},
        )

    def _load(self, split: str) -> list[Example]:
        n = self.num_train if split == "train" else self.num_test
        return [self.generate(split, i) for i in range(n)]

    def answer_class(self, gold: str) -> str | None:
        """"rare" when the gold answer's unit word lies in the tail of its Zipf list (RARE_ANSWER_MASS),
        else "common"; None for a gold string without a known unit word."""
        word = gold.strip().partition(" ")[2].strip().lower()
        if word not in UNIT_WORDS:
            return None
        return "rare" if word in RARE_ANSWER_WORDS else "common"

    # ------------------------------------------------------------------ prompt / verify
    def prompt(self, example: Example) -> str:
        return PROMPT.format(question=example.question)

    def sft_text(self, example: Example) -> str:
        if example.solution:
            return example.solution
        return f"#### {example.answer}"

    @staticmethod
    def _gold(example: Example) -> tuple[str, tuple[str, str]]:
        number, _, word = example.answer.strip().partition(" ")
        word = word.strip().lower()
        forms = UNIT_WORDS.get(word) or (word.rstrip("s"), word if word.endswith("s") else word + "s")
        return number, forms

    def _check(self, completion: str, example: Example) -> tuple[bool, bool, str | None]:
        """The final answer line must hold the gold number first and the unit word (either number).

        The final answer line is the text after the last ``####`` up to the end of its line (with
        `answer_fallback`, the last non-empty line if there is no ``####``). It may not name any
        other known unit/object word, so listing every unit earns nothing.
        """
        tail = answer_tail(completion)
        idx = tail.rfind("####")
        if idx >= 0:
            line = tail[idx + 4:].lstrip().split("\n", 1)[0].strip()
        elif self.answer_fallback:
            lines = [ln.strip() for ln in tail.splitlines() if ln.strip()]
            line = lines[-1] if lines else ""
        else:
            return False, False, None
        line = line[:200]
        pred_num = first_number(line)
        format_ok = idx >= 0 and pred_num is not None
        number, forms = self._gold(example)
        words = set(_WORD.findall(line.lower()))
        others = {w for w in words if w in UNIT_WORDS and w not in forms}
        correct = numbers_equal(pred_num, number) and bool(words & set(forms)) and not others
        return correct, format_ok, line or None
