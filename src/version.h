#ifndef PORTICO_VERSION_H
#define PORTICO_VERSION_H

#define PORTICO_NAME "portico"
#endif
