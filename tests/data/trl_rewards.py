"""Reward functions as TRL's GRPOTrainer documentation writes them (the "Using a custom reward function"
section), kept unchanged but for math_reward_func's check, written inline where the docs call a helper they do
not define; the last three exercise trainer_state, completion_ids and a reward that never returns."""

import re


def reward_len(completions, **kwargs):
    return [-abs(20 - len(completion)) for completion in completions]


def format_reward_func(completions, **kwargs):
    """Reward function that checks if the completion has a specific format."""
    pattern = r"^<think>.*?</think><answer>.*?</answer>$"
    completion_contents = [completion[0]["content"] for completion in completions]
    matches = [re.match(pattern, content) for content in completion_contents]
    return [1.0 if match else 0.0 for match in matches]


def reward_func(completions, ground_truth, **kwargs):
    # Regular expression to capture content inside \boxed{}
    matches = [re.search(r"\\boxed\{(.*?)\}", completion) for completion in completions]
    contents = [match.group(1) if match else "" for match in matches]
    # Reward 1 if the content is the same as the ground truth, 0 otherwise
    return [1.0 if c == gt else 0.0 for c, gt in zip(contents, ground_truth)]


def math_reward_func(prompts, completions, task, **kwargs):
    rewards = []
    for prompt, completion, t in zip(prompts, completions, task):
        if t == "math":
            correct = "\\boxed{" in completion
            reward = 1.0 if correct else -1.0
            rewards.append(reward)
        else:
            rewards.append(None)
    return rewards


def step_reward(completions, trainer_state, **kwargs):
    return [float(trainer_state.global_step) for _ in completions]


def ids_reward(completion_ids, **kwargs):
    return [float(len(ids)) for ids in completion_ids]


def hangs(completions, **kwargs):
    import time

    time.sleep(3600)
