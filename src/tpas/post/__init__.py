"""Post-processing of ranked candidate lists: what runs between `infer.py` and `submit.py`.

- `lists`: a candidates table as [Q, K] arrays (`Lists`) and back; the shared representation.
- `methods`: `PostprocessConfig`, the method registry (`REGISTRY`: sca, assign, dual-softmax,
  inverted-softmax, rerank), `run_chain` / `apply_methods` and `tune`.
- `sca`: caption grouping (MiniLM, faiss, rapidfuzz) and Similarity Coverage Analysis.
- `ensemble`: score fusion of several stage dirs (`python -m tpas.post.ensemble`).
- `stage`: the `sca.py` stage (`SCAStageConfig`, `run_sca_stage`).

Dependencies point one way: `lists` ← `sca` ← `methods` ← `stage`; `ensemble` stands apart.
Inside tpas this package imports only tpas.schema, tpas.io, tpas.cli, tpas.errors and
tpas.metrics: nothing of the model, training or retrieval, so post-processing runs without torch.
"""
