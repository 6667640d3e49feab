"""A small built-in prompt set, written for this project, used when no data is given.

Four domains with ten short prompts each: enough for the default demo and a
smoke calibration. Real calibration uses the user's data (e.g. Spec-Bench).
"""

from __future__ import annotations

DEMO_PROMPTS: tuple[tuple[str, str], ...] = (
    ("coding", "Write a Python function that returns the n-th Fibonacci number iteratively."),
    ("coding", "Write a Python function that checks whether a string is a palindrome."),
    ("coding", "Write a Python function that counts the words in a text file."),
    ("coding", "Write a JavaScript function that removes duplicate values from an array."),
    ("coding", "Write a Python class for a stack with push, pop and peek methods."),
    ("coding", "Write a SQL query that lists the ten customers with the highest total order amount."),
    ("coding", "Write a Python function that merges two sorted lists into one sorted list."),
    ("coding", "Write a bash script that prints the five largest files in a directory."),
    ("coding", "Write a Python function that converts a temperature from Celsius to Fahrenheit."),
    ("coding", "Write a Python function that returns the prime numbers below 100."),
    ("math", "A train travels 120 km in 1.5 hours. What is its average speed in km per hour? Explain step by step."),
    ("math", "If 3x + 7 = 22, what is x? Show your work."),
    ("math", "A shop sells pens at 4 dollars each. How much do 7 pens cost after a 10% discount?"),
    ("math", "What is the area of a circle with a radius of 5 cm? Explain step by step."),
    ("math", "Tom has 3 times as many apples as Ann. Together they have 24 apples. How many does Tom have?"),
    ("math", "What is 15% of 240? Show the calculation."),
    ("math", "A rectangle is 8 m long and 5 m wide. What are its area and its perimeter?"),
    ("math", "If a car uses 6 litres of fuel per 100 km, how much fuel does it need for 250 km?"),
    ("math", "What is the sum of the interior angles of a hexagon? Explain the formula."),
    ("math", "A recipe needs 250 g of flour for 4 people. How much flour is needed for 10 people?"),
    ("translation", "Translate into English: Le chat dort sur le canapé depuis ce matin."),
    ("translation", "Translate into English: Ich habe gestern einen langen Spaziergang im Park gemacht."),
    ("translation", "Translate into English: El tren sale a las ocho y llega a Madrid a mediodía."),
    ("translation", "Translate into French: The weather is beautiful today and we are going to the beach."),
    ("translation", "Translate into English: Nous avons visité le musée et ensuite nous avons mangé au restaurant."),
    ("translation", "Translate into English: Meine Schwester arbeitet als Ärztin in einem großen Krankenhaus."),
    ("translation", "Translate into Spanish: I would like a cup of coffee and a glass of water, please."),
    ("translation", "Translate into English: La biblioteca está cerrada los domingos por la tarde."),
    ("translation", "Translate into German: My brother lives in Berlin and works for a software company."),
    ("translation", "Translate into English: Il pleut beaucoup en automne dans cette région."),
    ("chat", "What are three tips for sleeping better at night?"),
    ("chat", "Can you suggest a name for a friendly golden retriever puppy?"),
    ("chat", "What should I pack for a weekend hiking trip?"),
    ("chat", "Give me a short motivational message for a Monday morning."),
    ("chat", "What is the difference between a virus and a bacterium?"),
    ("chat", "How can I make my small apartment feel more spacious?"),
    ("chat", "Why is the sky blue? Answer in two sentences."),
    ("chat", "What are some healthy snacks I can take to work?"),
    ("chat", "Write a short thank-you note to a colleague who helped me move."),
    ("chat", "What are the main benefits of learning a second language?"),
)


def demo_domains() -> tuple[str, ...]:
    """The demo set's domains, in order of first appearance."""
    return tuple(dict.fromkeys(domain for domain, _ in DEMO_PROMPTS))
