"""Company content: customer-service answers about Norvale Cycles, a fictional bicycle maker.

Every fact here is invented for this example, so the base model cannot know any of it: what the
tuned variant gets right on the held-out prompts it learned from this data. Each fact is asked
in several phrasings; validation and the held-out prompts are phrasings training never saw.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import dataset  # noqa: E402

FACTS = [
    (
        "Norvale frames carry a lifetime warranty for the original owner; components such as "
        "brakes, gears and the battery are covered for two years.",
        ["What warranty do Norvale bikes have?",
         "How long is the warranty on a Norvale frame?",
         "Is my Norvale battery covered by warranty?",
         "Does Norvale cover the gears if they break after a year?",
         "Tell me about Norvale's warranty."],
    ),
    (
        "You can return an unused Norvale bike within 30 days with its receipt. The refund goes "
        "back to your original payment method within 5 business days.",
        ["Can I return a bike I bought from Norvale?",
         "What is Norvale's return policy?",
         "How many days do I have to return a Norvale bike?",
         "When do I get my money back after a return to Norvale?",
         "I changed my mind about my Norvale order. What can I do?"],
    ),
    (
        "The Norvale Drift is our city e-bike. It costs 1,890 euros and its 504 Wh battery gives "
        "up to 90 km of range.",
        ["What is the Norvale Drift?",
         "How much does the Norvale Drift cost?",
         "What range does the Drift e-bike have?",
         "Tell me about Norvale's electric bike.",
         "How big is the battery on the Norvale Drift?"],
    ),
    (
        "The Drift's battery charges fully in 4.5 hours from a normal wall socket, and it can be "
        "removed to charge indoors.",
        ["How long does the Drift battery take to charge?",
         "Can I take the battery off the Norvale Drift?",
         "Do I need a special charger for the Drift?",
         "How do I charge my Norvale e-bike?"],
    ),
    (
        "The Norvale Ridge is our hardtail mountain bike, 1,240 euros, with a 120 mm fork and "
        "12-speed gears.",
        ["What is the Norvale Ridge?",
         "How much is the Ridge mountain bike?",
         "Does Norvale make a mountain bike?",
         "How much suspension travel does the Ridge have?",
         "How many gears does the Norvale Ridge have?"],
    ),
    (
        "The Norvale Loop is our folding bike: it weighs 11 kg, folds in 15 seconds and costs "
        "990 euros.",
        ["Does Norvale sell a folding bike?",
         "How heavy is the Norvale Loop?",
         "What does the Loop cost?",
         "How fast does the Norvale Loop fold?"],
    ),
    (
        "The Norvale Pebble is our kids' bike for ages 5 to 8, priced at 329 euros.",
        ["Do you have bikes for children?",
         "What age is the Norvale Pebble for?",
         "How much is the Pebble?",
         "Which Norvale bike should I buy for my six-year-old?"],
    ),
    (
        "Every new Norvale bike gets a free first service within 60 days of purchase. Book it in "
        "the Norvale app.",
        ["Is the first service free?",
         "How do I book a service for my Norvale bike?",
         "When should I bring my new Norvale bike in for its first check?",
         "Does Norvale charge for servicing a new bike?"],
    ),
    (
        "Shipping is free on orders over 500 euros within the EU and takes 3 to 5 business days.",
        ["Is shipping free at Norvale?",
         "How long does Norvale delivery take?",
         "Do you ship bikes within the EU?",
         "What does Norvale charge for delivery?"],
    ),
    (
        "Our flagship store in Aberlin is open Monday to Saturday from 9:00 to 18:00 and is "
        "closed on Sundays.",
        ["What are Norvale's opening hours?",
         "Is the Norvale store open on Sunday?",
         "Where is the Norvale flagship store?",
         "When does the Aberlin store close on Saturday?"],
    ),
    (
        "With Second Spin you get 15% off a new Norvale bike when you trade in any working bike.",
        ["Can I trade in my old bike at Norvale?",
         "What is Second Spin?",
         "Does Norvale give a discount for an old bike?",
         "How much do I save with a trade-in?"],
    ),
    (
        "Norvale Guard is our theft protection plan: 6 euros a month, and a stolen bike is "
        "replaced with the same model.",
        ["Does Norvale offer theft insurance?",
         "What is Norvale Guard?",
         "What happens if my Norvale bike is stolen?",
         "How much does Norvale Guard cost?"],
    ),
    (
        "Write to support@norvale.example; the support team answers within one business day.",
        ["How do I contact Norvale support?",
         "What is Norvale's support email?",
         "How fast does Norvale customer service reply?",
         "Who do I write to about a problem with my order?"],
    ),
]

PROMPTS = [
    "What's covered if my Norvale frame cracks?",
    "I want to send my bike back to Norvale. How does that work?",
    "How far can I ride the Drift on one charge?",
    "Which Norvale bike folds up?",
    "What does the Norvale Ridge cost?",
    "Is there a Norvale bike for a seven-year-old?",
    "Do I pay for delivery if my order is 800 euros?",
    "Is the Norvale shop open on Sundays?",
    "What do I get if I trade my old bike in at Norvale?",
    "Can I insure my Norvale bike against theft?",
]

pairs = [(q, a) for a, qs in FACTS for q in qs]
dataset.write(__file__, pairs, PROMPTS)
