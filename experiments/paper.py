"""The ESP paper's published numbers (arXiv 2603.17942: Tables 1-6), for side-by-side tables. Cells the paper does not
give are absent (shown blank), never invented."""

PAPER_MODEL = {
    "llama3_8b": "Llama-3.1-8B-Instruct",
    "llama3_2_3b": "Llama-3.2-3B-Instruct",
    "qwen3_8b": "Qwen3-8B",
    "qwen3_32b": "Qwen3-32B",
}

# Table 1: (model, bc) -> method -> (tau, speedup)
TABLE1 = {
    ("llama3_8b", 30): {"pld": (1.44, 1.23), "stand": (1.58, 1.10), "lade": (1.45, 1.06), "esp": (1.63, 1.35)},
    ("llama3_8b", 60): {"pld": (1.44, 1.23), "stand": (1.64, 1.14), "lade": (1.60, 1.14), "esp": (1.71, 1.38)},
    ("qwen3_8b", 60): {"pld": (1.31, 1.12), "stand": (1.48, 1.06), "lade": (1.73, 1.21), "esp": (1.74, 1.43)},
    ("qwen3_32b", 60): {"pld": (1.29, 1.09), "stand": (1.48, 1.13), "lade": (1.69, 1.31), "esp": (1.70, 1.48)},
    ("llama3_2_3b", 60): {"pld": (1.43, 1.19), "stand": (1.62, 1.07), "lade": (1.57, 1.10), "esp": (1.63, 1.22)},
}
# Table 3 (tau at bc 60) by number of masks; Table 5 (tau) by init — (llama3_2_3b, llama3_8b)
TABLE3 = {1: {"llama3_2_3b": 1.65, "llama3_8b": 1.73}, 2: {"llama3_2_3b": 1.63, "llama3_8b": 1.71},
          3: {"llama3_2_3b": 1.51, "llama3_8b": 1.57}}
TABLE5 = {"mean": {"llama3_2_3b": 1.67, "llama3_8b": 1.71}, "sample": {"llama3_2_3b": 1.65, "llama3_8b": 1.69},
          "last_k": {"llama3_2_3b": 1.62, "llama3_8b": 1.67}}
# Table 4 (speedup at bc 60): impl -> model -> S/R
TABLE4 = {"naive": {"llama3_2_3b": 0.96, "llama3_8b": 1.07}, "efficient": {"llama3_2_3b": 1.22, "llama3_8b": 1.38}}
# Table 2: dynamic vs best static at bc 60 (the paper does not state the model)
TABLE2_BC60 = {"dynamic": 1.630, "best static": 1.631}

# The rivals' own published Spec-Bench figures (their model and GPU, greedy, batch 1), for the extended Table 1:
# (method, source, model, hardware) -> (τ = mean accepted tokens per step, speedup). Only figures the references
# state for Spec-Bench; see ../shared/docs/RIVALS.md for what was read where. Not given here: SuffixDecoding
# (its Spec-Bench figures were not verified) and LogitSpec (its abstract's 3.28 tokens / 2.61x are maxima over
# several benchmarks, not a Spec-Bench figure).
RIVALS_SPEC_BENCH = {
    ("pld", "SAM-Decoding README", "Vicuna-7B-v1.3", "RTX A6000"): (1.75, 1.56),
    ("recycling", "SAM-Decoding README", "Vicuna-7B-v1.3", "RTX A6000"): (2.83, 1.84),
    ("sam", "SAM-Decoding README", "Vicuna-7B-v1.3", "RTX A6000"): (2.30, 1.84),
    ("sam_tr", "SAM-Decoding README", "Vicuna-7B-v1.3", "RTX A6000"): (3.03, 2.27),
}
