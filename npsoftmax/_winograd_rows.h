/* One row of tiles of the Winograd F(2x2, 3x3) transforms (npsoftmax/winograd.py has the math,
 * npsoftmax/_im2col.pyx the kernels that call these).
 *
 * Why C: every loop below runs over the TW tiles of one row of tiles, and the compiler can
 * vectorise it only if it knows that the output does not overlap the input. Cython cannot say
 * `restrict`; C can. The loop bodies are written out in scalars (no small local arrays, no
 * inner loops): GCC 14 vectorises them only so. The functions are not inlined into Cython's
 * code, where they stayed scalar. Each exists for float (suffix _f) and double (_d).
 *
 * Layouts: `rows` are zero-padded image rows of width 2*TW + 2 (input side) or 2*TW (output
 * side), one after the other with `stride` values between rows; `slabs` points at the row's
 * first tile in slab 0 and holds entry k of tile tx at slabs[k * ss + tx] (k = 4*r + s, entry
 * (r, s) of the 4x4 tile; ss = the distance between slabs). `#pragma GCC ivdep`: the 16 runs
 * of one row never overlap (ss >= TW), which the compiler cannot prove by itself.
 */
#include <stddef.h>

#define NPSOFTMAX_WINOGRAD_ROWS(T, S)                                                                                                                       \
/* slabs <- B^T d B for the TW tiles whose 4x4 inputs are rows[0..3] x columns 2tx .. 2tx + 3.                         \
 * B^T d: rows (d0 - d2, d1 + d2, d2 - d1, d1 - d3) of d (u below), then (B^T d) B: the same                           \
 * combination of the 4 columns of each row of u. */                                                                   \
static __attribute__((noinline)) void winograd_input_row_##S(const T *restrict rows, ptrdiff_t stride,                 \
                                                            ptrdiff_t TW, T *restrict slabs, ptrdiff_t ss)             \
{                                                                                                                      \
    const T *r0 = rows, *r1 = rows + stride, *r2 = rows + 2 * stride, *r3 = rows + 3 * stride;                         \
    _Pragma("GCC ivdep")                                                                                               \
    for (ptrdiff_t tx = 0; tx < TW; tx++) {                                                                            \
        ptrdiff_t w = 2 * tx;                                                                                          \
        T u00 = r0[w] - r2[w], u01 = r0[w + 1] - r2[w + 1], u02 = r0[w + 2] - r2[w + 2], u03 = r0[w + 3] - r2[w + 3];  \
        T u10 = r1[w] + r2[w], u11 = r1[w + 1] + r2[w + 1], u12 = r1[w + 2] + r2[w + 2], u13 = r1[w + 3] + r2[w + 3];  \
        T u20 = r2[w] - r1[w], u21 = r2[w + 1] - r1[w + 1], u22 = r2[w + 2] - r1[w + 2], u23 = r2[w + 3] - r1[w + 3];  \
        T u30 = r1[w] - r3[w], u31 = r1[w + 1] - r3[w + 1], u32 = r1[w + 2] - r3[w + 2], u33 = r1[w + 3] - r3[w + 3];  \
        slabs[0 * ss + tx] = u00 - u02;  slabs[1 * ss + tx] = u01 + u02;                                               \
        slabs[2 * ss + tx] = u02 - u01;  slabs[3 * ss + tx] = u01 - u03;                                               \
        slabs[4 * ss + tx] = u10 - u12;  slabs[5 * ss + tx] = u11 + u12;                                               \
        slabs[6 * ss + tx] = u12 - u11;  slabs[7 * ss + tx] = u11 - u13;                                               \
        slabs[8 * ss + tx] = u20 - u22;  slabs[9 * ss + tx] = u21 + u22;                                               \
        slabs[10 * ss + tx] = u22 - u21; slabs[11 * ss + tx] = u21 - u23;                                              \
        slabs[12 * ss + tx] = u30 - u32; slabs[13 * ss + tx] = u31 + u32;                                              \
        slabs[14 * ss + tx] = u32 - u31; slabs[15 * ss + tx] = u31 - u33;                                              \
    }                                                                                                                  \
}                                                                                                                      \
                                                                                                                       \
/* rows[0], rows[stride] (2*TW values each) <- A^T m A + shift of the TW tiles in slabs.                               \
 * A^T m: rows (m0 + m1 + m2, m1 - m2 - m3) of m (a below), then the same of the columns. */                           \
static __attribute__((noinline)) void winograd_output_row_##S(const T *restrict slabs, ptrdiff_t ss,                   \
                                                             ptrdiff_t TW, T shift, T *restrict rows,                  \
                                                             ptrdiff_t stride)                                         \
{                                                                                                                      \
    T *y0 = rows, *y1 = rows + stride;                                                                                 \
    _Pragma("GCC ivdep")                                                                                               \
    for (ptrdiff_t tx = 0; tx < TW; tx++) {                                                                            \
        T a00 = slabs[tx] + slabs[4 * ss + tx] + slabs[8 * ss + tx];                                                   \
        T a01 = slabs[ss + tx] + slabs[5 * ss + tx] + slabs[9 * ss + tx];                                              \
        T a02 = slabs[2 * ss + tx] + slabs[6 * ss + tx] + slabs[10 * ss + tx];                                         \
        T a03 = slabs[3 * ss + tx] + slabs[7 * ss + tx] + slabs[11 * ss + tx];                                         \
        T a10 = slabs[4 * ss + tx] - slabs[8 * ss + tx] - slabs[12 * ss + tx];                                         \
        T a11 = slabs[5 * ss + tx] - slabs[9 * ss + tx] - slabs[13 * ss + tx];                                         \
        T a12 = slabs[6 * ss + tx] - slabs[10 * ss + tx] - slabs[14 * ss + tx];                                        \
        T a13 = slabs[7 * ss + tx] - slabs[11 * ss + tx] - slabs[15 * ss + tx];                                        \
        y0[2 * tx] = a00 + a01 + a02 + shift;                                                                          \
        y0[2 * tx + 1] = a01 - a02 - a03 + shift;                                                                      \
        y1[2 * tx] = a10 + a11 + a12 + shift;                                                                          \
        y1[2 * tx + 1] = a11 - a12 - a13 + shift;                                                                      \
    }                                                                                                                  \
}                                                                                                                      \
                                                                                                                       \
/* slabs <- A dy A^T for the TW 2x2 blocks dy of rows[0], rows[stride] (columns 2tx, 2tx + 1).                         \
 * A dy: rows (y0, y0 + y1, y0 - y1, -y1) of dy; then a row (p, q) becomes (p, p + q, p - q, -q). */                   \
static __attribute__((noinline)) void winograd_output_gradient_row_##S(const T *restrict rows, ptrdiff_t stride,       \
                                                                      ptrdiff_t TW, T *restrict slabs,                 \
                                                                      ptrdiff_t ss)                                    \
{                                                                                                                      \
    const T *y0 = rows, *y1 = rows + stride;                                                                           \
    _Pragma("GCC ivdep")                                                                                               \
    for (ptrdiff_t tx = 0; tx < TW; tx++) {                                                                            \
        T p0 = y0[2 * tx], q0 = y0[2 * tx + 1];                                                                        \
        T p3 = -y1[2 * tx], q3 = -y1[2 * tx + 1];                                                                      \
        T p1 = p0 - p3, q1 = q0 - q3;                                                                                  \
        T p2 = p0 + p3, q2 = q0 + q3;                                                                                  \
        slabs[0 * ss + tx] = p0;  slabs[1 * ss + tx] = p0 + q0;  slabs[2 * ss + tx] = p0 - q0;  slabs[3 * ss + tx] = -q0; \
        slabs[4 * ss + tx] = p1;  slabs[5 * ss + tx] = p1 + q1;  slabs[6 * ss + tx] = p1 - q1;  slabs[7 * ss + tx] = -q1; \
        slabs[8 * ss + tx] = p2;  slabs[9 * ss + tx] = p2 + q2;  slabs[10 * ss + tx] = p2 - q2; slabs[11 * ss + tx] = -q2; \
        slabs[12 * ss + tx] = p3; slabs[13 * ss + tx] = p3 + q3; slabs[14 * ss + tx] = p3 - q3; slabs[15 * ss + tx] = -q3; \
    }                                                                                                                  \
}                                                                                                                      \
                                                                                                                       \
/* rows[0..3] (columns 2tx .. 2tx + 3) += B dv B^T of the TW tiles in slabs, using part (16*TW                         \
 * scratch values). B dv: rows (v0, v1 - v2 + v3, -v0 + v1 + v2, -v3) of dv (b below), then the                        \
 * same of the columns. Neighbouring tiles overlap by 2 columns: the sums are added in two passes. */                  \
static __attribute__((noinline)) void winograd_input_gradient_row_##S(const T *restrict slabs, ptrdiff_t ss,           \
                                                                     ptrdiff_t TW, T *restrict part,                   \
                                                                     T *restrict rows, ptrdiff_t stride)               \
{                                                                                                                      \
    _Pragma("GCC ivdep")                                                                                               \
    for (ptrdiff_t tx = 0; tx < TW; tx++) {                                                                            \
        T b00 = slabs[tx], b01 = slabs[ss + tx], b02 = slabs[2 * ss + tx], b03 = slabs[3 * ss + tx];                   \
        T b30 = -slabs[12 * ss + tx], b31 = -slabs[13 * ss + tx], b32 = -slabs[14 * ss + tx], b33 = -slabs[15 * ss + tx]; \
        T b10 = slabs[4 * ss + tx] - slabs[8 * ss + tx] - b30, b11 = slabs[5 * ss + tx] - slabs[9 * ss + tx] - b31;    \
        T b12 = slabs[6 * ss + tx] - slabs[10 * ss + tx] - b32, b13 = slabs[7 * ss + tx] - slabs[11 * ss + tx] - b33;  \
        T b20 = slabs[4 * ss + tx] + slabs[8 * ss + tx] - b00, b21 = slabs[5 * ss + tx] + slabs[9 * ss + tx] - b01;    \
        T b22 = slabs[6 * ss + tx] + slabs[10 * ss + tx] - b02, b23 = slabs[7 * ss + tx] + slabs[11 * ss + tx] - b03;  \
        part[0 * TW + tx] = b00;  part[1 * TW + tx] = b01 - b02 + b03;  part[2 * TW + tx] = b01 + b02 - b00;  part[3 * TW + tx] = -b03; \
        part[4 * TW + tx] = b10;  part[5 * TW + tx] = b11 - b12 + b13;  part[6 * TW + tx] = b11 + b12 - b10;  part[7 * TW + tx] = -b13; \
        part[8 * TW + tx] = b20;  part[9 * TW + tx] = b21 - b22 + b23;  part[10 * TW + tx] = b21 + b22 - b20; part[11 * TW + tx] = -b23; \
        part[12 * TW + tx] = b30; part[13 * TW + tx] = b31 - b32 + b33; part[14 * TW + tx] = b31 + b32 - b30; part[15 * TW + tx] = -b33; \
    }                                                                                                                  \
    for (int r = 0; r < 4; r++) {                                                                                      \
        T *row = rows + r * stride;                                                                                    \
        const T *c0 = part + 4 * r * TW, *c1 = c0 + TW, *c2 = c1 + TW, *c3 = c2 + TW;                                  \
        _Pragma("GCC ivdep")                                                                                           \
        for (ptrdiff_t tx = 0; tx < TW; tx++) {                                                                        \
            row[2 * tx] += c0[tx];                                                                                     \
            row[2 * tx + 1] += c1[tx];                                                                                 \
        }                                                                                                              \
        _Pragma("GCC ivdep")                                                                                           \
        for (ptrdiff_t tx = 0; tx < TW; tx++) {                                                                        \
            row[2 * tx + 2] += c2[tx];                                                                                 \
            row[2 * tx + 3] += c3[tx];                                                                                 \
        }                                                                                                              \
    }                                                                                                                  \
}                                                                                                                      \
                                                                                                                       \
/* The sum of n values: 8 running sums (that the compiler can keep in vector registers) instead                        \
 * of one long chain of dependent additions, added up in double at the end. */                                         \
static __attribute__((noinline)) double winograd_sum_##S(const T *restrict values, ptrdiff_t n)                        \
{                                                                                                                      \
    T l0 = 0, l1 = 0, l2 = 0, l3 = 0, l4 = 0, l5 = 0, l6 = 0, l7 = 0;                                                  \
    double total = 0;                                                                                                  \
    ptrdiff_t i = 0;                                                                                                   \
    for (; i + 8 <= n; i += 8) {                                                                                       \
        l0 += values[i]; l1 += values[i + 1]; l2 += values[i + 2]; l3 += values[i + 3];                                \
        l4 += values[i + 4]; l5 += values[i + 5]; l6 += values[i + 6]; l7 += values[i + 7];                            \
    }                                                                                                                  \
    for (; i < n; i++)                                                                                                 \
        total += values[i];                                                                                            \
    return total + (double)l0 + l1 + l2 + l3 + l4 + l5 + l6 + l7;                                                      \
}

NPSOFTMAX_WINOGRAD_ROWS(float, f)
NPSOFTMAX_WINOGRAD_ROWS(double, d)
