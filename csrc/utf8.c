/*
** utf8.c: UTF-8 well-formedness, code points and maximal subparts.
*/
#include <string.h>
#include "utf8.h"

enum { WELL_FORMED, ILL_FORMED, CUT_SHORT };

/* The sequence starting s (n >= 1), against table 3-7: returns how many
   bytes it spans (the whole sequence, or its maximal subpart) and whether it
   is well-formed, ill-formed, or well-formed so far but cut short by n. */
static size_t scan(const unsigned char *s, size_t n, int *kind) {
  unsigned c = s[0], lo = 0x80, hi = 0xBF;
  size_t len;
  if (c < 0x80) { *kind = WELL_FORMED; return 1; }
  if (c >= 0xC2 && c <= 0xDF) len = 2;
  else if (c >= 0xE0 && c <= 0xEF) { len = 3; if (c == 0xE0) lo = 0xA0; else if (c == 0xED) hi = 0x9F; }
  else if (c >= 0xF0 && c <= 0xF4) { len = 4; if (c == 0xF0) lo = 0x90; else if (c == 0xF4) hi = 0x8F; }
  else { *kind = ILL_FORMED; return 1; }   /* 80..C1, F5..FF never start a sequence */
  size_t k = 1;
  while (k < len && k < n && s[k] >= (k == 1 ? lo : 0x80) && s[k] <= (k == 1 ? hi : 0xBF)) k++;
  *kind = k == len ? WELL_FORMED : k == n ? CUT_SHORT : ILL_FORMED;
  return k;
}

int gptoss_utf8_decode(const unsigned char *s, size_t n, uint32_t *cp) {
  if (!n) return 0;
  int kind;
  size_t len = scan(s, n, &kind);
  if (kind != WELL_FORMED) return 0;
  static const unsigned char lead_bits[5] = {0, 0x7F, 0x1F, 0x0F, 0x07};
  uint32_t v = s[0] & lead_bits[len];
  for (size_t k = 1; k < len; k++) v = (v << 6) | (s[k] & 0x3F);
  *cp = v;
  return (int)len;
}

size_t gptoss_utf8_valid(const unsigned char *s, size_t n) {
  size_t i = 0;
  while (i < n) {
    if (s[i] < 0x80) {
      /* ASCII runs eight bytes at a time */
      while (i + 8 <= n) {
        uint64_t w;
        memcpy(&w, s + i, 8);
        if (w & 0x8080808080808080ull) break;
        i += 8;
      }
      while (i < n && s[i] < 0x80) i++;
      continue;
    }
    int kind;
    size_t len = scan(s + i, n - i, &kind);
    if (kind != WELL_FORMED) return i;
    i += len;
  }
  return n;
}

size_t gptoss_utf8_subpart(const unsigned char *s, size_t n, int *incomplete) {
  int kind;
  size_t len = scan(s, n, &kind);
  *incomplete = kind == CUT_SHORT;
  return len;
}

size_t gptoss_utf8_tail(const unsigned char *s, size_t n) {
  /* a cut-short sequence is a lead byte and at most two continuation bytes,
     and it starts at the last byte that is not a continuation byte */
  for (size_t back = 1; back <= 3 && back <= n; back++) {
    unsigned c = s[n - back];
    if (c >= 0x80 && c < 0xC0) continue;
    int kind;
    scan(s + n - back, back, &kind);
    return kind == CUT_SHORT ? back : 0;
  }
  return 0;
}
