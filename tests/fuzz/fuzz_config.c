/* libFuzzer target: arbitrary bytes as a config text. config_load_string
 * must never crash, leak or hang: it returns a snapshot or messages.
 *
 * Build and run from the source tree:
 *   clang -g -O1 -fsanitize=fuzzer,address,undefined -Isrc $(pkg-config --cflags jansson) \
 *     tests/fuzz/fuzz_config.c src/config.c src/config_subst.c src/config_lines.c src/addr.c src/router.c src/uri.c src/http1.c \
 *     src/log.c $(pkg-config --libs jansson) -o fuzz_config
 *   ./fuzz_config -max_total_time=60 corpus-work tests/fuzz/corpus/config */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "config.h"

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc, (void)argv;
    /* Fixed environment so ${...} takes both paths, reproducibly. */
    setenv("FUZZ_SET", "127.0.0.1:8080", 1);
    setenv("FUZZ_EMPTY", "", 1);
    unsetenv("FUZZ_UNSET");
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size > 1 << 16) /* bigger inputs add time, not coverage */
        return 0;
    char *text = malloc(size + 1);
    if (!text)
        return 0;
    memcpy(text, data, size);
    text[size] = '\0'; /* config_load_string reads a C string: stops at a NUL */

    struct config_errors errs = { 0 };
    struct config *c = config_load_string(text, "/nonexistent/fuzz.json", &errs);
    if (c) {
        /* A loaded snapshot is complete: every route is usable. */
        for (size_t i = 0; i < c->nroutes; i++)
            if (!c->routes[i]->path || (!c->routes[i]->upstream && !c->routes[i]->respond_status))
                abort();
        if (!c->router || errs.n != 0)
            abort();
        config_ref(c);
        config_unref(c);
    } else if (errs.n == 0) {
        abort(); /* a refusal always says why */
    }
    config_unref(c);
    config_errors_free(&errs);
    free(text);
    return 0;
}
