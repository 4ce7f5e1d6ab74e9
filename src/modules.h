/* The module registry: the table generated at configure time
 * (modules/modules_table.c in the build tree) and the filter instances a
 * config holds. The core's view of modules; modules see only module.h. */
#ifndef PORTICO_MODULES_H
#define PORTICO_MODULES_H

#include <stddef.h>
#include "module.h"

/* NULL-terminated, in the order configure listed them. */
extern const struct module *const portico_modules[];

/* The module built in under this name, or NULL. */
const struct module *modules_find(const char *name);

/* One filter of a chain: a module and its parsed config. */
struct filter_conf {
    const struct module *m;
    void *cfg;
};

#endif
