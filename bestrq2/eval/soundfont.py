"""A minimal SoundFont (SF2, and SF3 with Ogg-compressed samples) note renderer for the instrument task.

fluidsynth would be the usual tool, but running it from unpacked Debian packages needs some twenty
libraries a minimal image lacks (SDL, PulseAudio, JACK, ...), so the eval suite renders single notes
itself: the preset's zones that cover the key and velocity, each zone's sample pitched by linear-
interpolation resampling (root key, coarse/fine tune, the sample's pitch correction), looped when the
zone says so, its initial attenuation applied, a 5 ms attack and a linear release. No modulators,
filters, LFOs, envelopes beyond that, chorus or reverb: enough to tell instrument families apart, not a
faithful synthesiser.

``SoundFont(path).render(program, key, velocity=100, seconds=1.0, release=0.4, sr=16000) -> float32 [T]``
"""
from __future__ import annotations

import io
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# generator operators used here (SoundFont 2.04, section 8.1.2)
INSTRUMENT, KEY_RANGE, VEL_RANGE, ATTENUATION, COARSE, FINE, SAMPLE_ID, SAMPLE_MODES, ROOT_KEY = \
    41, 43, 44, 48, 51, 52, 53, 54, 58
_RANGES = (KEY_RANGE, VEL_RANGE)


@dataclass
class Sample:
    start: int
    end: int
    loop_start: int
    loop_end: int
    rate: int
    pitch: int
    correction: int
    kind: int


@dataclass
class Zone:
    gens: dict[int, object] = field(default_factory=dict)

    def covers(self, key: int, vel: int) -> bool:
        lo, hi = self.gens.get(KEY_RANGE, (0, 127))
        vlo, vhi = self.gens.get(VEL_RANGE, (0, 127))
        return lo <= key <= hi and vlo <= vel <= vhi


def _chunks(buf: bytes, pos: int, end: int):
    while pos + 8 <= end:
        cid, size = buf[pos:pos + 4].decode("latin-1"), struct.unpack_from("<I", buf, pos + 4)[0]
        yield cid, pos + 8, size
        pos += 8 + size + (size & 1)


def _zones(bags: list[tuple[int, int]], gens: list[tuple[int, object]], first: int, last: int, key_gen: int
           ) -> list[Zone]:
    """Zones of one preset/instrument (bags first..last-1); a leading zone without ``key_gen`` is global
    and gives defaults to the others."""
    zones = [Zone(dict(gens[g] for g in range(bags[b][0], bags[b + 1][0]))) for b in range(first, last)]
    if zones and key_gen not in zones[0].gens:
        glob = zones.pop(0).gens
        zones = [Zone({**glob, **z.gens}) for z in zones]
    return [z for z in zones if key_gen in z.gens]


class SoundFont:
    def __init__(self, path: str | Path):
        buf = Path(path).read_bytes()
        if buf[:4] != b"RIFF" or buf[8:12] != b"sfbk":
            raise ValueError(f"{path}: not a SoundFont (RIFF sfbk)")
        self.path = str(path)
        parts: dict[str, tuple[int, int]] = {}
        for cid, pos, size in _chunks(buf, 12, len(buf)):
            if cid == "LIST":
                for sub, spos, ssize in _chunks(buf, pos + 4, pos + size):
                    parts[sub] = (spos, ssize)
        need = {"smpl", "phdr", "pbag", "pgen", "inst", "ibag", "igen", "shdr"}
        if need - parts.keys():
            raise ValueError(f"{path}: missing chunks {sorted(need - parts.keys())}")
        self._buf, self._smpl = buf, parts["smpl"]

        def records(name: str, fmt: str) -> list[tuple]:
            pos, size = parts[name]
            n = struct.calcsize(fmt)
            return [struct.unpack_from(fmt, buf, pos + i * n) for i in range(size // n)]

        def gens(name: str) -> list[tuple[int, object]]:
            out = []
            for op, amount in records(name, "<HH"):
                if op in _RANGES:
                    out.append((op, (amount & 0xFF, amount >> 8)))
                else:
                    out.append((op, amount - 65536 if amount >= 32768 else amount))
            return out

        phdr = records("phdr", "<20sHHHIII")
        pbag, ibag = records("pbag", "<HH"), records("ibag", "<HH")
        inst = records("inst", "<20sH")
        pgen, igen = gens("pgen"), gens("igen")
        self.samples = [Sample(s, e, ls, le, r, p, c, t) for _, s, e, ls, le, r, p, c, _, t in
                        records("shdr", "<20sIIIIIBbHH")]
        self.instruments = [_zones(ibag, igen, inst[i][1], inst[i + 1][1], SAMPLE_ID) for i in range(len(inst) - 1)]
        self.presets = {(bank, prog): _zones(pbag, pgen, bag, phdr[i + 1][3], INSTRUMENT)
                        for i, (_, prog, bank, bag, *_rest) in enumerate(phdr[:-1])}
        self._decoded: dict[int, np.ndarray] = {}

    def _sample_data(self, i: int) -> np.ndarray:
        """Sample i as float32 in [-1, 1]; SF3 (type bit 0x10) holds an Ogg stream, byte-addressed."""
        if i not in self._decoded:
            s, pos = self.samples[i], self._smpl[0]
            if s.kind & 0x10:
                import soundfile as sf

                x, _ = sf.read(io.BytesIO(self._buf[pos + s.start:pos + s.end]), dtype="float32", always_2d=True)
                x = x[:, 0]
            else:
                x = np.frombuffer(self._buf, dtype="<i2", count=s.end - s.start, offset=pos + 2 * s.start)
                x = x.astype(np.float32) / 32768.0
            self._decoded[i] = x
        return self._decoded[i]

    def render(self, program: int, key: int, velocity: int = 100, seconds: float = 1.0, release: float = 0.4,
               sr: int = 16000, bank: int = 0) -> np.ndarray:
        """One note of General MIDI ``program`` (0-127): held ``seconds``, then a linear release."""
        zones = self.presets.get((bank, program))
        if zones is None:
            raise ValueError(f"{self.path}: no preset bank {bank} program {program}")
        n_hold, n_rel = int(seconds * sr), int(release * sr)
        out = np.zeros(n_hold + n_rel, np.float32)
        for pz in zones:
            if not pz.covers(key, velocity) or not 0 <= pz.gens[INSTRUMENT] < len(self.instruments):
                continue
            for iz in self.instruments[pz.gens[INSTRUMENT]]:
                if not iz.covers(key, velocity) or not 0 <= iz.gens[SAMPLE_ID] < len(self.samples):
                    continue
                out += self._voice(pz, iz, key, n_hold, n_rel, sr)
        peak = float(np.abs(out).max())
        return out * (0.5 / peak) if peak > 0 else out

    def _voice(self, pz: Zone, iz: Zone, key: int, n_hold: int, n_rel: int, sr: int) -> np.ndarray:
        s = self.samples[iz.gens[SAMPLE_ID]]
        data = self._sample_data(iz.gens[SAMPLE_ID])
        root = iz.gens.get(ROOT_KEY, -1)
        root = s.pitch if root < 0 or root > 127 else root
        semis = key - root + iz.gens.get(COARSE, 0) + pz.gens.get(COARSE, 0) + \
            (iz.gens.get(FINE, 0) + pz.gens.get(FINE, 0) + s.correction) / 100.0
        step = 2.0 ** (semis / 12.0) * s.rate / sr
        n = n_hold + n_rel
        pos = np.arange(n, dtype=np.float64) * step
        looped = iz.gens.get(SAMPLE_MODES, 0) & 1
        if s.kind & 0x10:  # SF3: loop points count from the decoded sample's start
            ls, le = s.loop_start, s.loop_end
        else:
            ls, le = s.loop_start - s.start, s.loop_end - s.start
        if looped and 0 <= ls < le <= len(data) and le - ls > 1:
            over = pos >= le
            pos[over] = ls + np.mod(pos[over] - ls, le - ls)
        pos = pos[pos < len(data) - 1]
        i = pos.astype(np.int64)
        frac = (pos - i).astype(np.float32)
        y = np.zeros(n, np.float32)
        y[:len(i)] = data[i] * (1 - frac) + data[i + 1] * frac
        env = np.ones(n, np.float32)
        attack = min(n, int(0.005 * sr))
        env[:attack] = np.linspace(0, 1, attack, dtype=np.float32)
        env[n_hold:] = np.linspace(1, 0, n_rel, dtype=np.float32)
        gain = 10.0 ** (-(iz.gens.get(ATTENUATION, 0) + pz.gens.get(ATTENUATION, 0)) / 200.0)  # centibels
        return y * env * gain
