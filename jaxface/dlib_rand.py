"""``dlib::rand``: dlib's random number stream, reproduced so that results that
depend on dlib's draws (chinese whispers' visiting order, face jitter) are dlib's.

The generator is the 32-bit Mersenne twister (mt19937) seeded 5489 for dlib's
default empty seed string (else with the string's ``s = s * 37 + char`` hash),
primed with 10,000 draws; a 64-bit number is two outputs, the first the high half.
"""

from __future__ import annotations

import numpy as np

# mt19937 (Matsumoto & Nishimura; parameters as in the C++ standard).
_N, _M = 624, 397
_MATRIX_A = np.uint32(0x9908B0DF)
_UPPER, _LOWER = np.uint32(0x80000000), np.uint32(0x7FFFFFFF)
_MASK32 = 0xFFFFFFFF


def _mt_seed(value: int) -> np.ndarray:
  state = [value & _MASK32]
  for i in range(1, _N):
    prev = state[-1]
    state.append((1812433253 * (prev ^ (prev >> 30)) + i) & _MASK32)
  return np.asarray(state, np.uint32)


def _mt_mix(upper_of: np.ndarray, lower_of: np.ndarray, far: np.ndarray) -> np.ndarray:
  y = (upper_of & _UPPER) | (lower_of & _LOWER)
  return far ^ (y >> np.uint32(1)) ^ np.where((y & np.uint32(1)) != 0, _MATRIX_A, np.uint32(0))


def _mt_twist(x: np.ndarray) -> np.ndarray:
  """The next 624 words of state. New word i needs old words i, i+1 and word i+397 (mod 624), which
  for i >= 227 is already a new one: three vectorized runs plus the last word."""
  new = np.empty_like(x)
  new[:227] = _mt_mix(x[:227], x[1:228], x[397:624])
  new[227:454] = _mt_mix(x[227:454], x[228:455], new[:227])
  new[454:623] = _mt_mix(x[454:623], x[455:624], new[227:396])
  new[623] = _mt_mix(x[623:624], new[0:1], new[396:397])[0]
  return new


def _mt_temper(y: np.ndarray) -> np.ndarray:
  y = y ^ (y >> np.uint32(11))
  y = y ^ ((y << np.uint32(7)) & np.uint32(0x9D2C5680))
  y = y ^ ((y << np.uint32(15)) & np.uint32(0xEFC60000))
  return y ^ (y >> np.uint32(18))


class DlibRand:
  """``dlib::rand``'s integer stream: :meth:`uint32` and :meth:`uint64` draw like
  ``get_random_32bit_number`` and ``get_random_64bit_number`` (vectorized, ``n`` at a time).

  ``seed``: dlib's seed string ("" = ``dlib::rand()``); an int is its decimal string, as dlib's
  ``rand(time_t)`` constructor makes it.
  """

  def __init__(self, seed: int | str = ""):
    if isinstance(seed, bool) or not isinstance(seed, (int, str)):
      raise ValueError(f"seed: expected a string or an int (dlib's seed string), got {seed!r}")
    text = str(seed)
    if text:
      s = 0
      for b in text.encode("utf-8"):  # dlib casts a (signed) char to uint32
        s = (s * 37 + (b if b < 128 else b - 256 + (1 << 32))) & _MASK32
    else:
      s = 5489
    self._state = _mt_seed(s)
    self._buffer = np.zeros(0, np.uint32)
    self.uint32(10000)  # dlib primes the generator

  def uint32(self, n: int) -> np.ndarray:
    """The next ``n`` outputs, uint32 [n]."""
    parts, have = [self._buffer], self._buffer.shape[0]
    while have < n:
      self._state = _mt_twist(self._state)
      parts.append(_mt_temper(self._state))
      have += _N
    out = np.concatenate(parts)
    self._buffer = out[n:]
    return out[:n]

  def uint64(self, n: int) -> np.ndarray:
    """The next ``n`` 64-bit numbers, uint64 [n]: (first << 32) | second of each pair."""
    w = self.uint32(2 * n).astype(np.uint64).reshape(n, 2)
    return (w[:, 0] << np.uint64(32)) | w[:, 1]

  def double(self) -> float:
    """dlib's ``get_random_double``: 48 random bits from two draws, in [0, 1)."""
    a, b = (int(v) & 0xFFFFFF for v in self.uint32(2))
    val = (float(a) * 0x1000000 + b) / _DOUBLE_MAX
    return val if val < 1.0 else 1.0 - np.finfo(np.float64).eps

  def in_range(self, begin: float, end: float) -> float:
    """dlib's ``get_double_in_range(begin, end)``."""
    return begin + self.double() * (end - begin)


# dlib divides its 48-bit number by slightly more than 2**48 - 1 so the result stays below 1.
_DOUBLE_MAX = float(0xFFFFFF) * 0x1000000 + 0xFFFFFF + 0.05
