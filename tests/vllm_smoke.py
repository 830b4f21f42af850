"""Run by tests in a subprocess: load each model directory in vLLM and generate one greedy completion.

A subprocess keeps vLLM's memory and threads out of the pytest process. Prints one JSON line.
"""

import json
import sys

if __name__ == "__main__":
    from vllm import SamplingParams

    from rl.rollout import make_llm

    results = {}
    for model_dir in sys.argv[1:]:
        llm = make_llm(model_dir, max_model_len=512)
        out = llm.chat([{"role": "user", "content": "What is 12 + 7?"}],
                       SamplingParams(max_tokens=16, temperature=0.0, logprobs=0), use_tqdm=False)[0].outputs[0]
        results[model_dir] = {"text": out.text, "n_tokens": len(out.token_ids),
                              "logprobs": [next(iter(lp.values())).logprob for lp in out.logprobs]}
        del llm
    print("RESULT " + json.dumps(results))
