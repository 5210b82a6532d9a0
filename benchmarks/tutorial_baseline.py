"""The one baseline every speed comparison is made against: the Show-Attend-Tell PyTorch
tutorial's training-step decoder, re-implemented plainly (no code taken from it) at its shapes.
``bench.py`` times the project's ``LSTMDecoder`` against it side by side."""

from __future__ import annotations

import torch
from torch import nn


class TutorialDecoder(nn.Module):
    """The tutorial's decoder, re-implemented plainly as the side-by-side baseline: per step the
    grid's attention projection is recomputed for the active rows, the context gated, one
    LSTMCell step and the vocabulary projection run on the rows whose captions have not ended."""

    def __init__(self, vocab, enc, emb, hid, att, dropout=0.5):
        super().__init__()
        self.enc_att, self.dec_att = nn.Linear(enc, att), nn.Linear(hid, att)
        self.full_att = nn.Linear(att, 1)
        self.embedding = nn.Embedding(vocab, emb)
        self.dropout = nn.Dropout(dropout)
        self.lstm = nn.LSTMCell(emb + enc, hid)
        self.init_h, self.init_c = nn.Linear(enc, hid), nn.Linear(enc, hid)
        self.f_beta = nn.Linear(hid, enc)
        self.fc = nn.Linear(hid, vocab)
        self.vocab = vocab

    def forward(self, feats, caps, lengths):
        """feats (B, R, C); caps (B, T+1) with BOS; lengths (B,) tokens incl. BOS and EOS."""
        lengths, order = lengths.sort(descending=True)
        feats, caps = feats[order], caps[order]
        decode_lengths = (lengths - 1).tolist()
        emb = self.embedding(caps)  # (B, T+1, E)
        mean = feats.mean(1)
        h, c = self.init_h(mean), self.init_c(mean)
        B, T = feats.size(0), max(decode_lengths)
        preds = feats.new_zeros(B, T, self.vocab)
        alphas = feats.new_zeros(B, T, feats.size(1))
        for t in range(T):
            n = sum(dl > t for dl in decode_lengths)
            att1 = self.enc_att(feats[:n])  # (n, R, A): recomputed at every step
            att2 = self.dec_att(h[:n])
            alpha = self.full_att(torch.relu(att1 + att2[:, None])).squeeze(2).softmax(1)
            ctx = (feats[:n] * alpha[:, :, None]).sum(1)
            ctx = torch.sigmoid(self.f_beta(h[:n])) * ctx
            h, c = self.lstm(torch.cat([emb[:n, t], ctx], 1), (h[:n], c[:n]))
            preds[:n, t] = self.fc(self.dropout(h))
            alphas[:n, t] = alpha
        return preds, caps[:, 1:], decode_lengths, alphas
