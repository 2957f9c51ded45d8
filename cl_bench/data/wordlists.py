"""Small vocabularies shared by the tiny model's pretraining corpus and the synthetic tasks,
so every word a synthetic task uses is a token sequence the tiny model has seen."""

ANIMALS = "cat dog bird fish horse cow sheep goat lion tiger bear wolf fox mouse frog duck".split()
FOODS = "apple bread cheese soup cake rice milk tea coffee juice pizza salad".split()
THINGS = (
    "house car train boat plane road river lake hill tree flower stone cloud rain snow sun moon star "
    "book pen cup door window chair table lamp clock phone shoe hat coat bag box key ring ball"
).split()
NOUNS = ANIMALS + FOODS + THINGS

POSITIVE = (
    "good great nice lovely excellent wonderful fine pleasant happy bright fresh tasty "
    "amazing perfect friendly clean warm calm"
).split()

NEGATIVE = (
    "bad awful poor terrible horrible nasty sad dull stale bland broken dirty rude ugly cold noisy boring weak"
).split()

COLORS = "red blue green yellow black white brown pink gray orange purple".split()

VERBS = "sees likes finds takes moves holds wants makes helps calls opens brings".split()

NAMES = "anna ben carl dora emma finn gina hugo ida jack kira leo mia nora omar pia".split()
