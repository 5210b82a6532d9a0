"""Show, Attend and Tell's second stage: the encoder stays frozen, then its last blocks train."""

from captioner.cli.train import run


def test_encoder_unfreezes_after_the_configured_epoch(train_cfg, monkeypatch):
    snapshots = {}
    from captioner.training import module as module_py

    original = module_py.CaptioningModule.on_train_epoch_start

    def spy(self):
        original(self)
        blocks = list(self.model.encoder.blocks)
        snapshots[self.current_epoch] = (
            [p.requires_grad for p in blocks[-1].parameters()],
            [p.requires_grad for p in blocks[0].parameters()],
            {g.get("name"): g.get("lr") for g in self.trainer.optimizers[0].param_groups},
        )

    monkeypatch.setattr(module_py.CaptioningModule, "on_train_epoch_start", spy)
    run(train_cfg("trainer.max_epochs=2", "trainer.limit_train_batches=1",
                  "trainer.limit_val_batches=1", "test=false",
                  "model.encoder.trainable_layers=1", "model.encoder.finetune_after_epoch=1",
                  "+model.encoder.finetune_lr=1e-5"))
    last0, first0, groups = snapshots[0]
    last1, first1, _ = snapshots[1]
    assert not any(last0) and not any(first0)  # epoch 0: frozen
    assert all(last1) and not any(first1)  # epoch 1: only the last block trains
    assert groups["encoder"] == 1e-5
