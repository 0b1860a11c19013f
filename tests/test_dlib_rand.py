"""dlib::rand reproduced: the mt19937 stream, seeds, 64-bit and double draws."""

import numpy as np

from jaxface import dlib_rand


def test_dlib_rand_stream():
  r = dlib_rand.DlibRand.__new__(dlib_rand.DlibRand)
  r._state, r._buffer = dlib_rand._mt_seed(5489), np.zeros(0, np.uint32)
  w = r.uint32(10000)
  assert w[0] == 3499211612 and w[-1] == 4123659995  # std::mt19937 (the C++ standard's check value)
  a, b = dlib_rand.DlibRand(), dlib_rand.DlibRand()
  words = a.uint32(3)
  assert b.uint64(1)[0] == (int(words[0]) << 32) | int(words[1])  # high half first
  # Drawing in pieces or at once gives the same stream (the buffer across twists).
  c, d = dlib_rand.DlibRand("seed"), dlib_rand.DlibRand("seed")
  np.testing.assert_array_equal(np.concatenate([c.uint32(5), c.uint32(700), c.uint32(1)]), d.uint32(706))
  assert not np.array_equal(dlib_rand.DlibRand(7).uint32(4), dlib_rand.DlibRand("").uint32(4))
  np.testing.assert_array_equal(dlib_rand.DlibRand(7).uint32(4), dlib_rand.DlibRand("7").uint32(4))


def test_dlib_rand_is_mt19937_primed():
  r = dlib_rand.DlibRand()
  fresh = np.random.RandomState(5489).randint(0, 1 << 32, size=10002, dtype=np.uint32)
  assert fresh[9999] == 4123659995  # mt19937's 10,000th output (C++ [rand.predef])
  want = ((int(fresh[10000]) & 0xFFFFFF) * 0x1000000 + (int(fresh[10001]) & 0xFFFFFF)) / dlib_rand._DOUBLE_MAX
  assert r.double() == want
  assert 0.97 <= dlib_rand.DlibRand().in_range(0.97, 0.99999) < 0.99999
