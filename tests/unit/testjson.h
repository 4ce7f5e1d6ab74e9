/* JSON for module config tests, written with ' for " so the tests stay
 * readable: j("{'origins': ['https://a.example']}"). Returns NULL (and
 * says why) on bad JSON; the caller owns the result. */
#ifndef PORTICO_TESTJSON_H
#define PORTICO_TESTJSON_H
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static json_t *j(const char *s)
{
    char *text = strdup(s);
    for (char *p = text; *p; p++)
        if (*p == '\'')
            *p = '"';
    json_error_t je;
    json_t *v = json_loads(text, JSON_DECODE_ANY, &je);
    if (!v)
        fprintf(stderr, "bad test JSON %s: %s\n", text, je.text);
    free(text);
    return v;
}
#endif
