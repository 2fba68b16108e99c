/*
** json.c: member-by-member walking of a JSON object on top of cJSON.
**
** tokenizer.json is 27 MB, of which 21 MB are BPE merges that a rank-based
** BPE never reads; parsing them costs most of the load time. cJSON parses
** one value at a time from a buffer (cJSON_ParseWithLengthOpts), so this
** file only finds where members begin and skips the ones nobody needs.
*/
#include <stdlib.h>
#include <string.h>
#include <cjson/cJSON.h>
#include "internal.h"

static const char *ws(const char *p, const char *end) {
  while (p < end && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r')) p++;
  return p;
}

int gptoss_json_walk_begin(gptoss_json_walk *w, const char *p, const char *end) {
  w->start = p;
  w->end = end;
  p = ws(p, end);
  if (p >= end || *p != '{') { w->p = p; return -1; }
  w->p = p + 1;
  w->first = 1;
  return 0;
}

size_t gptoss_json_walk_offset(const gptoss_json_walk *w) { return (size_t)(w->p - w->start); }

int gptoss_json_walk_next(gptoss_json_walk *w, char **key) {
  const char *p = ws(w->p, w->end);
  if (p >= w->end) { w->p = p; return -1; }
  if (*p == '}') { w->p = p + 1; return 0; }
  if (!w->first) {
    if (*p != ',') { w->p = p; return -1; }
    p = ws(p + 1, w->end);
  }
  w->first = 0;
  if (p >= w->end || *p != '"') { w->p = p; return -1; }
  const char *after = NULL;
  cJSON *k = cJSON_ParseWithLengthOpts(p, (size_t)(w->end - p), &after, 0);
  if (!k || !cJSON_IsString(k)) { cJSON_Delete(k); w->p = p; return -1; }
  *key = strdup(k->valuestring);
  cJSON_Delete(k);
  if (!*key) return -1;
  p = ws(after, w->end);
  if (p >= w->end || *p != ':') { free(*key); *key = NULL; w->p = p; return -1; }
  w->p = ws(p + 1, w->end);
  return 1;
}

cJSON *gptoss_json_walk_value(gptoss_json_walk *w) {
  const char *after = NULL;
  cJSON *v = cJSON_ParseWithLengthOpts(w->p, (size_t)(w->end - w->p), &after, 0);
  if (v) w->p = after;
  return v;
}

/* Skips one value, checking bracket balance and string syntax only. */
int gptoss_json_walk_skip(gptoss_json_walk *w) {
  const char *p = w->p, *end = w->end;
  int depth = 0;
  do {
    p = ws(p, end);
    if (p >= end) return -1;
    char c = *p;
    if (c == '"') {
      /* jump from quote to quote; a quote preceded by an odd number of
         backslashes is escaped and does not end the string */
      for (p++;;) {
        const char *q = memchr(p, '"', (size_t)(end - p));
        if (!q) return -1;
        const char *b = q;
        while (b > p && b[-1] == '\\') b--;
        p = q + 1;
        if (((q - b) & 1) == 0) break;
      }
    } else if (c == '{' || c == '[') {
      depth++; p++;
    } else if (c == '}' || c == ']') {
      if (--depth < 0) return -1;
      p++;
    } else if (c == ',' || c == ':') {
      if (depth == 0) return -1;
      p++;
    } else {
      const char *q = p;
      while (p < end && !strchr(" \t\r\n,:]}[{\"", *p)) p++;
      if (p == q) return -1;
    }
  } while (depth > 0);
  w->p = p;
  return 0;
}
