"""Hand-written evaluation data for this project (not taken from any benchmark).

* :data:`PAIRS`: 48 sentence pairs with a graded similarity score from 0
  (unrelated) to 5 (same meaning), eight per grade, written for qarray.
* :data:`CALIBRATION`: 32 held-out sentences (no overlap with the pairs) used
  only to collect static activation ranges.
* :func:`latency_batch`: 32 sentences of 64 real tokens for timing.

Example:
  >>> len(PAIRS), {g for _, _, g in PAIRS} == set(range(6))
  (48, True)
"""

from __future__ import annotations

__all__ = ['PAIRS', 'CALIBRATION', 'pair_sentences', 'latency_batch']

# (sentence a, sentence b, graded similarity 0..5)
PAIRS: list[tuple[str, str, int]] = [
    # 5: same meaning, different words
    ("A man is playing the guitar on stage.", "On stage, a man plays a guitar.", 5),
    ("The cat is sleeping on the windowsill.", "A cat sleeps on the window ledge.", 5),
    ("The train to Boston leaves at noon.", "The Boston train departs at twelve o'clock.", 5),
    ("She bought three apples at the market.", "At the market she purchased three apples.", 5),
    ("The meeting has been postponed until Friday.", "The meeting was moved to Friday.", 5),
    ("It is raining heavily in the city today.", "There is a heavy downpour in the city today.", 5),
    ("The children are building a sandcastle on the beach.", "Kids are making a sand castle at the beach.", 5),
    ("He forgot his umbrella at the office.", "He left his umbrella behind at work.", 5),
    # 4: nearly the same, a detail differs or is missing
    ("A woman is slicing tomatoes in the kitchen.", "A woman is cutting vegetables.", 4),
    ("The dog chased the ball across the park.", "A dog is running after a ball.", 4),
    ("The company reported record profits this quarter.", "The firm's quarterly earnings were the highest ever.", 4),
    ("Two boys are riding bicycles down the hill.", "Two kids ride bikes downhill quickly.", 4),
    ("The pilot landed the plane safely despite the storm.", "The plane landed safely in bad weather.", 4),
    ("The museum is closed on Mondays.", "You cannot visit the museum on Monday.", 4),
    ("A chef is grilling fish over an open fire.", "Someone is cooking fish on a grill.", 4),
    ("The student finished her thesis last night.", "She completed her dissertation yesterday.", 4),
    # 3: same topic and situation, important differences
    ("A man is playing the piano in a bar.", "A man is singing in a bar.", 3),
    ("The bus was late this morning.", "The train was delayed this morning.", 3),
    ("She is reading a novel in the garden.", "She is writing a letter in the garden.", 3),
    ("The team won the football match yesterday.", "The team lost the football match yesterday.", 3),
    ("A girl is feeding ducks at the pond.", "A girl is swimming in the pond.", 3),
    ("The price of gasoline rose again this week.", "The price of bread rose this week.", 3),
    ("He is painting the fence white.", "He is repairing the broken fence.", 3),
    ("The doctor examined the patient's lungs.", "The nurse took the patient's blood pressure.", 3),
    # 2: related topic, different events
    ("The orchestra performed a Beethoven symphony.", "Tickets for the concert sold out quickly.", 2),
    ("A farmer is harvesting wheat in the field.", "Bread prices depend on the weather.", 2),
    ("The astronauts returned from the space station.", "A new rocket engine was tested in Texas.", 2),
    ("She planted roses in her backyard.", "The garden center opens early on weekends.", 2),
    ("The hikers reached the summit at sunrise.", "Mountain weather can change very quickly.", 2),
    ("A programmer is fixing a bug in the code.", "The new laptop has a faster processor.", 2),
    ("The river flooded several villages.", "Heavy rain is expected in the north.", 2),
    ("He ordered a coffee and a croissant.", "The bakery on the corner sells fresh bread.", 2),
    # 1: barely related (a shared word or a loose association)
    ("A man is playing the guitar.", "The man bought a new car.", 1),
    ("The cat knocked over a glass of water.", "Water boils at one hundred degrees.", 1),
    ("She runs five kilometers every morning.", "The morning news covered the election.", 1),
    ("The bank raised interest rates.", "They had a picnic on the river bank.", 1),
    ("A child is drawing a picture of the sun.", "Solar panels were installed on the roof.", 1),
    ("The library extended its opening hours.", "He reads the newspaper on the train.", 1),
    ("The soup needs more salt.", "The roads were salted before the snowfall.", 1),
    ("A dog is barking at the mailman.", "The post office raised the price of stamps.", 1),
    # 0: unrelated
    ("A man is playing the guitar on stage.", "The stock market fell sharply on Tuesday.", 0),
    ("The cat is sleeping on the windowsill.", "Parliament passed the new tax law.", 0),
    ("She bought three apples at the market.", "The volcano erupted for the first time in a century.", 0),
    ("The children are building a sandcastle.", "Quantum computers use qubits instead of bits.", 0),
    ("He forgot his umbrella at the office.", "The orchestra tuned their instruments.", 0),
    ("The pilot landed the plane safely.", "My grandmother knits warm scarves.", 0),
    ("A chef is grilling fish.", "The software update fixed a security flaw.", 0),
    ("The museum is closed on Mondays.", "Penguins live in the southern hemisphere.", 0),
]

# Held out from PAIRS: only used to calibrate static activation ranges.
CALIBRATION: list[str] = [
    "The weather forecast predicts snow for the weekend.",
    "A young woman is jogging along the river.",
    "Our neighbors adopted a small brown puppy.",
    "The city council approved the new budget.",
    "He spilled coffee on his keyboard this morning.",
    "Scientists discovered a new species of frog.",
    "The concert was cancelled because of the storm.",
    "She is learning to play the violin.",
    "Two men are carrying a sofa up the stairs.",
    "The restaurant serves excellent pasta.",
    "Traffic was heavy on the highway tonight.",
    "The teacher handed out the exam papers.",
    "A boat is sailing across the calm lake.",
    "The store offers a discount on winter coats.",
    "My phone battery dies too quickly.",
    "The final episode of the series aired last night.",
    "A group of tourists is taking photos of the bridge.",
    "The baby laughed at the funny noise.",
    "Electric cars are becoming more affordable.",
    "The old castle attracts many visitors every year.",
    "He repaired the leaking kitchen tap.",
    "The marathon runners crossed the finish line.",
    "A squirrel is hiding nuts under the tree.",
    "The hospital opened a new children's ward.",
    "She translated the book from Spanish into English.",
    "The printer on the second floor is out of paper.",
    "Fresh strawberries are in season now.",
    "The committee will announce the winners tomorrow.",
    "A cyclist is waiting at the red light.",
    "The wind blew the leaves across the yard.",
    "They are planning a trip to the mountains.",
    "The factory reduced its energy consumption.",
]


def pair_sentences() -> tuple[list[str], list[tuple[int, int]], list[int]]:
    """Unique sentences of :data:`PAIRS`, each pair as indices into them, and the gold grades.

    Example:
      >>> sents, idx, gold = pair_sentences()
      >>> sents[idx[0][0]] == PAIRS[0][0], len(gold)
      (True, 48)
    """
    sents: list[str] = []
    where: dict[str, int] = {}
    idx = []
    for a, b, _ in PAIRS:
        for s in (a, b):
            if s not in where:
                where[s] = len(sents)
                sents.append(s)
        idx.append((where[a], where[b]))
    return sents, idx, [g for _, _, g in PAIRS]


def latency_batch(batch: int = 32) -> list[str]:
    """``batch`` long sentences (several pair sentences joined) that fill 64 tokens when truncated.

    Example:
      >>> len(latency_batch())
      32
    """
    sents, _, _ = pair_sentences()
    return [' '.join(sents[(i + j) % len(sents)] for j in range(6)) for i in range(batch)]
