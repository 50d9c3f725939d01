// Skiparse index maps (OSP-Next Skiparse-2D, Open-Sora Plan v1.3 Skiparse-1D): which sub-sequence and which
// position a token of the (T, H, W) latent grid takes in the sparse layout, and back. Torch-free, shared by the
// CPU and CUDA permute kernels. Every op of the family is a row gather "destination row <- source row or zeros"
// whose source is found by one of the maps at the end of this file.
//
// Sparse layout: [G * B, N' / G, C], row s * B + b (sub-sequence s outer, sample b inner). Both modes put a token
// at sub-grid coordinates (t, h_s, w_s); along a split axis of extent X (padded to a multiple of P^2):
//   token: digit x mod P,               sub-coordinate floor(x / P)
//   group: digit floor(x / P) mod P,    sub-coordinate floor(x / P^2) * P + x mod P
// 2D splits h and w (s = digit_h * P + digit_w, G = P^2); 1D splits the flat token index (grid (1, 1, N), G = P).
// x grows with the sub-coordinate, so the valid (unpadded) tokens of a sub-sequence form the box
// T x count_h x count_w of its sub-grid. The layout is compact: that box comes first, row-major, and the padded
// slots (always zeros) fill the tail, so attention needs only a key length per sub-sequence.
#pragma once

#include "difforge/common.h"

namespace difforge::skiparse {

enum class Mode : int { token = 0, group = 1 };

DF_INLINE Mode other(Mode m) { return m == Mode::token ? Mode::group : Mode::token; }

DF_INLINE int64_t axis_digit(Mode m, int64_t x, int64_t P) { return m == Mode::token ? x % P : (x / P) % P; }

DF_INLINE int64_t axis_sub(Mode m, int64_t x, int64_t P) {
  return m == Mode::token ? x / P : (x / (P * P)) * P + x % P;
}

// Inverse of (axis_digit, axis_sub).
DF_INLINE int64_t axis_coord(Mode m, int64_t digit, int64_t sub, int64_t P) {
  return m == Mode::token ? sub * P + digit : (sub / P) * P * P + digit * P + sub % P;
}

// Number of x < extent with this digit; the valid sub-coordinates are exactly [0, count).
DF_INLINE int64_t axis_count(Mode m, int64_t extent, int64_t digit, int64_t P) {
  if (m == Mode::token) return extent > digit ? (extent - digit + P - 1) / P : 0;
  const int64_t rest = extent % (P * P) - digit * P;
  return (extent / (P * P)) * P + (rest < 0 ? 0 : rest > P ? P : rest);
}

struct Layout {
  int64_t T = 1, H = 1, W = 1;  // the original grid; 1D is (1, 1, N)
  int64_t P = 1;
  bool split_h = true;  // 2D; 1D splits w only
  int64_t batch = 1;
  int64_t ssp_rank = 0, ssp_size = 1;

  DF_INLINE int64_t block() const { return P * P; }
  DF_INLINE int64_t padded_h() const { return split_h ? ceil_div(H, block()) * block() : H; }
  DF_INLINE int64_t padded_w() const { return ceil_div(W, block()) * block(); }
  DF_INLINE int64_t sub_h() const { return split_h ? padded_h() / P : 1; }
  DF_INLINE int64_t sub_w() const { return padded_w() / P; }
  DF_INLINE int64_t groups() const { return split_h ? P * P : P; }
  DF_INLINE int64_t local_groups() const { return groups() / ssp_size; }
  DF_INLINE int64_t seq_len() const { return T * sub_h() * sub_w(); }  // N' / G
  DF_INLINE int64_t tokens() const { return T * H * W; }
  DF_INLINE int64_t local_rows() const { return local_groups() * batch; }
  // Exchange buffer of the SSP switch: [S, G_loc (destination), G_loc (source), B, base]; base is the grid
  // (T, H' / P^2, W' / P^2) of the tokens one token sub-sequence shares with one group sub-sequence.
  DF_INLINE int64_t base() const { return T * (split_h ? padded_h() / block() : 1) * (padded_w() / block()); }
};

// Valid box of sub-sequence s in mode m.
struct Box {
  int64_t digit_h, digit_w, count_h, count_w;
};

DF_INLINE Box box_of(const Layout& l, Mode m, int64_t s) {
  Box b;
  b.digit_h = l.split_h ? s / l.P : 0;
  b.digit_w = l.split_h ? s % l.P : s;
  b.count_h = l.split_h ? axis_count(m, l.H, b.digit_h, l.P) : 1;
  b.count_w = axis_count(m, l.W, b.digit_w, l.P);
  return b;
}

DF_INLINE int64_t valid_count(const Layout& l, Mode m, int64_t s) {
  const Box b = box_of(l, m, s);
  return l.T * b.count_h * b.count_w;
}

struct Coord {
  int64_t t, h, w;
};

struct Slot {
  int64_t s, j;
};

DF_INLINE Slot slot_of(const Layout& l, Mode m, Coord c) {
  const int64_t dh = l.split_h ? axis_digit(m, c.h, l.P) : 0;
  const int64_t s = dh * l.P + axis_digit(m, c.w, l.P);
  const Box b = box_of(l, m, s);
  const int64_t hs = l.split_h ? axis_sub(m, c.h, l.P) : 0;
  return {s, (c.t * b.count_h + hs) * b.count_w + axis_sub(m, c.w, l.P)};
}

// The token at slot (s, j); false for a padded slot.
DF_INLINE bool coord_of(const Layout& l, Mode m, Slot slot, Coord* c) {
  const Box b = box_of(l, m, slot.s);
  if (slot.j >= l.T * b.count_h * b.count_w) return false;
  const int64_t ws = slot.j % b.count_w, rest = slot.j / b.count_w;
  c->t = rest / b.count_h;
  c->h = l.split_h ? axis_coord(m, b.digit_h, rest % b.count_h, l.P) : 0;
  c->w = axis_coord(m, b.digit_w, ws, l.P);
  return true;
}

// ---- the gathers: destination row -> source (outer, inner) index, or -1 (write zeros) -----------------------

struct Source {
  int64_t outer, inner;  // outer < 0: zeros
};

DF_INLINE Source zeros_source() { return {-1, 0}; }

// x [B, N] (original order) -> local sparse rows [G_loc * B, N' / G].
DF_INLINE Source pack_source(const Layout& l, Mode m, int64_t row, int64_t j) {
  const int64_t s = l.ssp_rank * l.local_groups() + row / l.batch;
  Coord c;
  if (!coord_of(l, m, {s, j}, &c)) return zeros_source();
  return {row % l.batch, (c.t * l.H + c.h) * l.W + c.w};
}

// local sparse rows -> x [B, N]; tokens of other ranks' sub-sequences are zeros.
DF_INLINE Source restore_source(const Layout& l, Mode m, int64_t b, int64_t i) {
  const Coord c = {i / (l.H * l.W), (i / l.W) % l.H, i % l.W};
  const Slot slot = slot_of(l, m, c);
  const int64_t local = slot.s - l.ssp_rank * l.local_groups();
  if (local < 0 || local >= l.local_groups()) return zeros_source();
  return {local * l.batch + b, slot.j};
}

// sparse rows in mode `from` -> the same rows in the other mode (single process: S = 1).
DF_INLINE Source switch_source(const Layout& l, Mode from, int64_t row, int64_t j) {
  Coord c;
  if (!coord_of(l, other(from), {row / l.batch, j}, &c)) return zeros_source();
  const Slot slot = slot_of(l, from, c);
  return {slot.s * l.batch + row % l.batch, slot.j};
}

// The token that token sub-sequence `tok` and group sub-sequence `grp` share at position `pos` of base.
DF_INLINE Coord shared_coord(const Layout& l, int64_t tok, int64_t grp, int64_t pos) {
  const int64_t blocks_w = l.padded_w() / l.block();
  const int64_t blocks_h = l.split_h ? l.padded_h() / l.block() : 1;
  const Box bt = box_of(l, Mode::token, tok), bg = box_of(l, Mode::group, grp);
  const int64_t bw = pos % blocks_w, bh = (pos / blocks_w) % blocks_h, t = pos / (blocks_w * blocks_h);
  const int64_t h = l.split_h ? bh * l.block() + bg.digit_h * l.P + bt.digit_h : 0;
  return {t, h, bw * l.block() + bg.digit_w * l.P + bt.digit_w};
}

// SSP switch, step 1 (on rank r): local rows in mode `from` -> send buffer [S, G_loc (g), G_loc (sl), B, base];
// entry (dest rank, g, sl, b, pos) is the token source sub-sequence r * G_loc + sl sends to destination
// sub-sequence dest * G_loc + g.
DF_INLINE Source exchange_send_source(const Layout& l, Mode from, int64_t e) {
  const int64_t base = l.base(), gl = l.local_groups();
  const int64_t pos = e % base, b = (e / base) % l.batch, sl = (e / (base * l.batch)) % gl;
  const int64_t g = (e / (base * l.batch * gl)) % gl, dest = e / (base * l.batch * gl * gl);
  const int64_t s_from = l.ssp_rank * gl + sl, s_to = dest * gl + g;
  const Coord c = from == Mode::token ? shared_coord(l, s_from, s_to, pos) : shared_coord(l, s_to, s_from, pos);
  if (c.h >= l.H || c.w >= l.W) return zeros_source();
  return {sl * l.batch + b, slot_of(l, from, c).j};
}

// SSP switch, step 3 (on rank r, after all_to_all): receive buffer [S (source rank), G_loc (g), G_loc (sl), B,
// base] -> local rows in the other mode. Returned as (0, flat buffer row).
DF_INLINE Source exchange_receive_source(const Layout& l, Mode from, int64_t row, int64_t j) {
  const int64_t gl = l.local_groups(), g = row / l.batch, b = row % l.batch;
  Coord c;
  if (!coord_of(l, other(from), {l.ssp_rank * gl + g, j}, &c)) return zeros_source();
  const int64_t s_from = slot_of(l, from, c).s;
  const int64_t blocks_w = l.padded_w() / l.block();
  const int64_t blocks_h = l.split_h ? l.padded_h() / l.block() : 1;
  const int64_t pos = (c.t * blocks_h + c.h / l.block()) * blocks_w + c.w / l.block();
  return {0, ((((s_from / gl) * gl + g) * gl + s_from % gl) * l.batch + b) * l.base() + pos};
}

// ---- one gather op: destination [rows / inner, inner, row_bytes] (contiguous) <- source rows or zeros ----------

enum class Gather : int { pack, restore, switch_modes, exchange_send, exchange_receive };

struct GatherParams {
  Gather kind = Gather::pack;
  Layout layout;
  Mode mode = Mode::token;  // pack / restore: the layout's mode; switch / exchange: the mode switched from
  const void* src = nullptr;
  int64_t src_outer_stride = 0, src_inner_stride = 0;  // bytes
  void* dst = nullptr;
  int64_t dst_rows = 0, dst_inner = 1;
  int64_t row_bytes = 0;
};

DF_INLINE Source gather_source(const GatherParams& p, int64_t row) {
  const int64_t outer = row / p.dst_inner, inner = row % p.dst_inner;
  switch (p.kind) {
    case Gather::pack: return pack_source(p.layout, p.mode, outer, inner);
    case Gather::restore: return restore_source(p.layout, p.mode, outer, inner);
    case Gather::switch_modes: return switch_source(p.layout, p.mode, outer, inner);
    case Gather::exchange_send: return exchange_send_source(p.layout, p.mode, row);
    case Gather::exchange_receive: return exchange_receive_source(p.layout, p.mode, outer, inner);
  }
  return zeros_source();
}

// Byte offset of the source row, or -1 for zeros.
DF_INLINE int64_t source_offset(const GatherParams& p, int64_t row) {
  const Source s = gather_source(p, row);
  return s.outer < 0 ? -1 : s.outer * p.src_outer_stride + s.inner * p.src_inner_stride;
}

}  // namespace difforge::skiparse
