"""The zero-shot prompt, the stop marker and the prefills (METHOD.md §3)."""

from __future__ import annotations

from softtokens.errors import UsageError

PROMPT_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first shows the complete reasoning process step by step, then provides the final answer "
    "in \\boxed{}. The assistant must always follow the format: 'User: [question] Assistant: [detailed "
    "reasoning] The final answer is: \\boxed{[answer]}.' User: {question} Assistant:"
)

MARKER = "The final answer is:"
MARKER_PREFILL = " \\boxed{"
LENGTH_PREFILL = " The final answer is: \\boxed{"

# The graded answer is this text followed by the answer tokens (METHOD.md §3).
ANSWER_PREFIX = "\\boxed{"


def check_template(template: str) -> None:
    """A prompt template needs the slot the question goes into."""
    if "{question}" not in template:
        raise UsageError("prompt_template must contain a {question} slot")


def format_prompt(question: str, template: str = PROMPT_TEMPLATE) -> str:
    """The raw-text prompt for one question: ``{question}`` is the only slot, and every other brace (``\\boxed{}``)
    is text. An empty question is an error, not an empty prompt."""
    if not isinstance(question, str) or not question.strip():
        raise UsageError(f"empty question: every question needs text (got {question!r})")
    return template.replace("{question}", question.strip())


def ends_with_marker(text: str, marker: str = MARKER) -> bool:
    """Whether the CoT text ends with the marker, trailing whitespace ignored."""
    return text.rstrip().endswith(marker)
