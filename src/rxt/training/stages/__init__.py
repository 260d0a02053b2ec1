"""The curriculum's stages, each a loss over its own batches for the one training loop
(:mod:`rxt.training.loop`): ``joint`` (stages 1–2: joint LM pre-training and interaction SFT),
``memory`` (stage 3: self-supervised memory-attention pre-training), ``smat`` (stage 4:
supervised memory-aware training) and ``stateless`` (the baselines, on SMAT's dialogues)."""
