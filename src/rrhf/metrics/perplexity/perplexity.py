"""Perplexity of texts under a local causal language model, as an offline `evaluate` module.

Load it by folder: `evaluate.load("/abs/path/to/src/rrhf/metrics/perplexity")` (evaluate imports
<folder>/<folder name>.py). It computes exactly `rrhf.evaluation.perplexities`; mode "paper" reproduces
the authors' metric script (2 ** mean NLL over the first 19 tokens), mode "exact" is exp(mean NLL) over
the whole text.
"""

import datasets
import evaluate
import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rrhf.evaluation import perplexities

_DESCRIPTION = """Perplexity of each prediction under a causal language model loaded from a local folder,
scored after a prepended BOS token (EOS where there is none). mode="paper": the text is cut to its first
19 tokens and the value is 2 ** (mean NLL in nats), as the old `datasets` metric the RRHF authors used.
mode="exact": the whole text (up to the model's positions), exp(mean NLL)."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): texts to score; newlines become spaces, an empty text becomes " ".
    model_id (str): a local folder with a causal LM and its tokenizer (loaded in fp32).
    mode (str): "paper" or "exact". Defaults to "paper".
    batch_size (int): texts per forward pass. Defaults to 8.
    device (str, optional): defaults to "cuda" when available, else "cpu".
Returns:
    perplexities (list of float): one per prediction, in input order.
    mean_perplexity (float): their arithmetic mean.
"""

_CITATION = """@inproceedings{yuan2023rrhf,
  title={RRHF: Rank Responses to Align Language Models with Human Feedback},
  author={Yuan, Zheng and Yuan, Hongyi and Tan, Chuanqi and Wang, Wei and Huang, Songfang and Huang, Fei},
  booktitle={Advances in Neural Information Processing Systems},
  year={2023}
}"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Perplexity(evaluate.Metric):
    """Perplexity of texts under a local causal LM (`rrhf.evaluation.perplexities`)."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            module_type="metric",
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string")}),
        )

    def _compute(
        self, predictions, model_id: str, mode: str = "paper", batch_size: int = 8, device: str | None = None
    ) -> dict:
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = AutoModelForCausalLM.from_pretrained(model_id, dtype=torch.float32).to(device)
        tokenizer = AutoTokenizer.from_pretrained(model_id)
        values = perplexities(list(predictions), model, tokenizer, mode=mode, batch_size=batch_size)
        return {"perplexities": values, "mean_perplexity": float(np.mean(values))}
