"""Layer-prediction distillation from a frozen teacher encoder (DistilHuBERT-style).

The student's chosen hidden states each pass through their own linear projection and
are trained to match the teacher's chosen hidden states, frame by frame, with an L1
term plus ``-log sigmoid(cosine)``. Teacher and student must have the same frame rate
(wav2vec2-family students and Whisper teachers both give 20 ms frames); frames beyond
the shorter of the two sequences, and padding, are left out.

The teacher hears the clean clip and the student the augmented one when augmentation
is on, so the student also learns to undo the corruption. The teacher is held outside
``state_dict`` (it is never trained nor saved); the projections are training-only and
are not part of the saved encoder.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..encoders.wav2vec2 import SpeechEncoder


def spread_layers(n_student_layers: int, count: int) -> list[int]:
    """``count`` student hidden-state indices spread evenly up to the last layer (8, 3 -> [3, 5, 8])."""
    return [max(1, round(n_student_layers * (k + 1) / count)) for k in range(count)]


class Distiller(nn.Module):
    """``loss(student_hidden, student_frames, teacher_input, teacher_lengths)`` -> (loss, parts)."""

    def __init__(self, teacher: SpeechEncoder, teacher_layers: list[int], student_layers: list[int], student_hidden: int):
        super().__init__()
        if len(teacher_layers) != len(student_layers):
            raise ValueError(f"teacher_layers {teacher_layers} and student layers {student_layers} differ in length")
        if not teacher_layers:
            raise ValueError("teacher_layers: name at least one teacher hidden state")
        top = teacher.num_layers - 1
        bad = [k for k in teacher_layers if not 0 <= k <= top]
        if bad:
            raise ValueError(f"config key 'teacher_layers': {bad} outside the teacher's hidden states 0..{top}")
        object.__setattr__(self, "teacher", teacher.eval())  # not a submodule: no state_dict, no DDP
        for p in teacher.parameters():
            p.requires_grad_(False)
        self.teacher_layers = list(teacher_layers)
        self.student_layers = list(student_layers)
        self.proj = nn.ModuleList(nn.Linear(student_hidden, teacher.hidden_size) for _ in teacher_layers)
        if student_hidden == teacher.hidden_size:  # same width: start from the identity (a student made from the teacher)
            with torch.no_grad():
                for p in self.proj:
                    p.weight.copy_(torch.eye(student_hidden))
                    p.bias.zero_()

    @torch.no_grad()
    def targets(self, waveforms: torch.Tensor, lengths: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        out = self.teacher(waveforms, lengths, all_layers=True)
        return [out.hidden_states[k].float() for k in self.teacher_layers], out.lengths

    def forward(self, student_hidden, student_frames: torch.Tensor, teacher_input: torch.Tensor,
                teacher_lengths: torch.Tensor) -> tuple[torch.Tensor, dict]:
        targets, teacher_frames = self.targets(teacher_input, teacher_lengths)
        total = student_hidden[0].new_zeros((), dtype=torch.float32)
        parts = {}
        for j, (k, proj, y) in enumerate(zip(self.student_layers, self.proj, targets)):
            x = proj(student_hidden[k].float())
            t = min(x.shape[1], y.shape[1])
            x, y = x[:, :t], y[:, :t]
            valid = torch.arange(t, device=x.device)[None, :] < torch.minimum(student_frames, teacher_frames)[:, None].to(x.device)
            n = valid.sum().clamp(min=1)
            l1 = ((x - y).abs().mean(-1) * valid).sum() / n
            cos = (-F.logsigmoid(F.cosine_similarity(x, y, dim=-1)) * valid).sum() / n
            total = total + l1 + cos
            parts[f"l1_{j}"], parts[f"cos_{j}"] = l1.detach(), cos.detach()
        return total / len(targets), parts
