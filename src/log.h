/* Error log: human-readable lines on stderr. The level is checked before
 * any formatting. Never pass a token, secret or password to these. */
#ifndef PORTICO_LOG_H
#define PORTICO_LOG_H

enum log_level { LOG_DEBUG = 0, LOG_INFO, LOG_WARN, LOG_ERROR };

extern int log_min_level;

/* Parse "debug"/"info"/"warn"/"error"; returns -1 for anything else. */
int log_level_parse(const char *s);
void log_write(int level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Print a message and abort: for out-of-memory and broken invariants only. */
void die(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));

#define log_at(level, ...) do { if ((level) >= log_min_level) log_write((level), __VA_ARGS__); } while (0)
#define log_debug(...) log_at(LOG_DEBUG, __VA_ARGS__)
#define log_info(...) log_at(LOG_INFO, __VA_ARGS__)
#define log_warn(...) log_at(LOG_WARN, __VA_ARGS__)
#define log_error(...) log_at(LOG_ERROR, __VA_ARGS__)

/* Allocation helpers that die on failure. */
#include <stddef.h>
void *xmalloc(size_t n);
void *xcalloc(size_t n, size_t m);
void *xrealloc(void *p, size_t n);
char *xstrdup(const char *s);
char *xstrndup(const char *s, size_t n);

#endif
