/*
** utf8.h: UTF-8, written once for the tokenizer and the binding (and,
** through the binding, the streaming decoder and harmony's parser).
**
** Well-formed means Unicode's table 3-7: no overlong forms, no surrogates
** (ED A0..BF), nothing above U+10FFFF. An ill-formed sequence is replaced by
** U+FFFD per maximal subpart (Unicode chapter 3, "U+FFFD Substitution of
** Maximal Subparts"): the longest prefix of some well-formed sequence, or
** one byte when there is none. That is what Python's
** decode("utf-8", "replace"), tiktoken and the harmony crate produce.
*/
#ifndef GPTOSS_UTF8_H
#define GPTOSS_UTF8_H

#include <stddef.h>
#include <stdint.h>

/* the code point starting s: its length (1..4) and *cp, or 0 when s does
   not start with a whole well-formed sequence (or n is 0) */
int gptoss_utf8_decode(const unsigned char *s, size_t n, uint32_t *cp);

/* the length of the longest well-formed prefix of s */
size_t gptoss_utf8_valid(const unsigned char *s, size_t n);

/* At an ill-formed spot (n >= 1, gptoss_utf8_decode(s, n) == 0): the length
   of the maximal subpart one U+FFFD replaces (1..3). *incomplete is set when
   that subpart is well-formed so far and only the end of s cut it short, so
   that more bytes could still complete it. */
size_t gptoss_utf8_subpart(const unsigned char *s, size_t n, int *incomplete);

/* the length of the sequence that is well-formed so far but cut short at
   the end of s (0..3): what a streaming decoder holds back */
size_t gptoss_utf8_tail(const unsigned char *s, size_t n);

#endif
