/* Socket addresses and CIDR ranges as written in the config. Pure code. */
#ifndef PORTICO_ADDR_H
#define PORTICO_ADDR_H

#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

/* Parse "IPv4:port", "[IPv6]:port" or "*:port" (any IPv4) into ss.
 * Host names are not resolved here (that is asynchronous work).
 * Returns 0, or -1 with a short reason in err. */
int addr_parse(const char *s, struct sockaddr_storage *ss, socklen_t *len,
               char *err, size_t errlen);

/* Format an address as "1.2.3.4:80" or "[::1]:80" into out (>= 64 bytes). */
void addr_format(const struct sockaddr *sa, char *out, size_t outlen);
/* Format only the IP ("1.2.3.4", "::1"); IPv4-mapped IPv6 prints as IPv4. */
void addr_format_ip(const struct sockaddr *sa, char *out, size_t outlen);

/* 127.0.0.0/8 or ::1 (or IPv4-mapped loopback). */
int addr_is_loopback(const struct sockaddr *sa);

struct cidr {
    int family;        /* AF_INET or AF_INET6 */
    uint8_t addr[16];  /* network bytes, masked */
    int prefix;
};

/* Parse "10.0.0.0/8", "::1/128" or a bare address (full-length prefix).
 * Returns 0, or -1 with a reason in err. */
int cidr_parse(const char *s, struct cidr *c, char *err, size_t errlen);
/* Does sa fall inside c? IPv4-mapped IPv6 addresses match IPv4 ranges. */
int cidr_match(const struct cidr *c, const struct sockaddr *sa);

#endif
