"""A varied prompt set: chat, code, lists, prose, math; 1 to ~1000 tokens."""

from __future__ import annotations

CHAT_QUESTIONS = [
    "What is the capital of France?",
    "Give me three tips for writing clean Python code.",
    "Explain photosynthesis to a ten-year-old.",
    "Write a haiku about autumn leaves.",
]

COMPLETIONS = [
    "def fibonacci(n):",
    "import numpy as np\n\ndef normalize(x):\n    \"\"\"Scale x to unit length.\"\"\"\n",
    "List of fruits:\n1. apple\n2.",
    "Shopping list:\n- milk\n- eggs\n-",
    "The three primary colours are",
    "Once upon a time",
    "Question: What is 12 plus 30?\nAnswer:",
    "SELECT name, age FROM users WHERE",
]

PROSE = (
    "The history of the printing press begins in the fifteenth century, when "
    "Johannes Gutenberg combined movable metal type, oil-based ink and a wooden "
    "screw press into a system that could produce books far faster than any "
    "scribe. Within decades, presses had spread across Europe, prices fell, "
    "and literacy began a long climb. Scholars could compare identical copies "
    "of a text, errors could be corrected in later editions, and ideas moved "
    "between cities in weeks rather than years. "
)


def prompt_token_ids(tokenizer) -> list[list[int]]:
    """16 prompts as token ids: one single-token prompt, 4 chat-templated, 8
    completions, 2 long prose prompts (~300 and ~600 tokens), one more."""
    chats = [tokenizer.encode(tokenizer.apply_chat_template(
        [{"role": "user", "content": q}], add_generation_prompt=True,
        tokenize=False), add_special_tokens=False) for q in CHAT_QUESTIONS]
    completions = [tokenizer.encode(p) for p in COMPLETIONS]
    long_prose = [tokenizer.encode(PROSE * 3 + "In summary,"),
                  tokenizer.encode(PROSE * 6 + "The most important consequence was")]
    single = [tokenizer.encode("The")[:1]]
    extra = [tokenizer.encode("Here is a short poem about the sea:\n")]
    return single + chats + completions + long_prose + extra


def near_max_len_prompt(tokenizer, max_model_len: int, room: int) -> list[int]:
    """A prose prompt leaving `room` tokens before max_model_len."""
    ids = tokenizer.encode(PROSE * 40)
    return ids[:max_model_len - room]
