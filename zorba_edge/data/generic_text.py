"""A few hundred tokens of plain, generic English that every run carries.

The fluency watch (zorba_edge/engine/fluency.py) measures the model's next-token loss on it: a
fine-tuning run on a classification task should leave it about where the base model has it,
and a run that breaks generation (issue 26: Gemma 3 on an unseen task, garbage after six
rounds) raises it. Written for this project (no licence attached to it); plain topics, no
sentiment and no task's label words, so that learning a task does not by itself move it.
"""

GENERIC_TEXT = (
    "The village sits at the bend of a slow river, and most mornings a thin mist lies over the "
    "water until the sun climbs above the hills. People walk to the market along a road lined "
    "with old trees. The baker opens his shop before dawn, and by seven o'clock the smell of "
    "fresh bread has reached the bridge. Children cross the square on their way to school, "
    "carrying books and small bags of lunch.\n\n"
    "In spring the farmers plant wheat, barley and potatoes in the fields to the north. They "
    "check the soil, mend the fences and clear the ditches so that the rain can drain away. "
    "When the weather turns warm, the orchards fill with white blossom and the bees return to "
    "their hives. Later in the year the apples are picked by hand, sorted in the barn and sent "
    "to the towns along the coast by train.\n\n"
    "The library is a small stone building next to the town hall. It holds a few thousand "
    "books, a collection of maps and the records of births and marriages going back two "
    "hundred years. On Tuesday evenings a teacher gives lessons in reading and arithmetic to "
    "adults who never had the chance to learn. Visitors often ask about the clock in the "
    "tower, which was built by a local carpenter and still keeps good time.\n\n"
    "To make a simple soup, wash and chop two onions, three carrots and a few potatoes. Warm a "
    "spoonful of oil in a large pot, add the onions and cook them gently for five minutes. Add "
    "the other vegetables, cover them with water, season with salt and pepper, and let the "
    "soup simmer for half an hour. Serve it hot with bread.\n\n"
    "A train leaves the station every hour. The journey to the city takes about forty "
    "minutes, passing through forests, farmland and two smaller towns. Many people use the "
    "time to read the newspaper, write letters or simply look out of the window at the "
    "changing seasons."
)
