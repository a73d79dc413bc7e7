ARC (AI2 Reasoning Challenge, ARC-V1-Feb2018), Allen Institute for AI.
Licensed under the Creative Commons Attribution-ShareAlike 4.0 International licence (CC BY-SA 4.0):
https://creativecommons.org/licenses/by-sa/4.0/

arc_challenge_test.jsonl.gz and arc_easy_test.jsonl.gz are adaptations (normalised to one JSON object per
line with the fields id, question, choices, label) and are shared under the same licence.
