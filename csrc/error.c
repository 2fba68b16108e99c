/*
** error.c: the per-thread failure message every engine call leaves behind.
*/
#include <stdarg.h>
#include <stdio.h>
#include "internal.h"

static _Thread_local char errbuf[1024];
static _Thread_local gptoss_status errcode;

const char *gptoss_errmsg(void) { return errbuf[0] ? errbuf : "no error"; }
gptoss_status gptoss_errcode(void) { return errcode; }

gptoss_status gptoss_fail(gptoss_status code, const char *fmt, ...) {
  va_list ap;
  char tmp[sizeof errbuf];  /* fmt's arguments may point into errbuf */
  va_start(ap, fmt);
  vsnprintf(tmp, sizeof tmp, fmt, ap);
  va_end(ap);
  snprintf(errbuf, sizeof errbuf, "%s", tmp);
  errcode = code;
  return code;
}
