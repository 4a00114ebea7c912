/*
 * LD_PRELOAD for wrk in the handshake runs: every new connection does a full TLS handshake.
 *
 * wrk keeps one SSL object per connection slot and reconnects with SSL_shutdown + SSL_clear,
 * which keeps the last session; the next SSL_connect then resumes it (TLS 1.3 PSK) whenever
 * the server sent a ticket, so "Connection: close" alone measures resumed handshakes, and only
 * for servers that resume. Dropping the session in SSL_clear makes every handshake full, for
 * every contender alike. compare.py checks the effect against nginx's $ssl_session_reused.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stddef.h>

typedef struct ssl_st SSL;
typedef struct ssl_session_st SSL_SESSION;
int SSL_set_session(SSL *s, SSL_SESSION *session);

int SSL_clear(SSL *s) {
    /* Every thread finds the same symbol, so the unsynchronised first store is harmless. */
    static int (*real_clear)(SSL *);
    if (real_clear == NULL) real_clear = (int (*)(SSL *))dlsym(RTLD_NEXT, "SSL_clear");
    if (real_clear == NULL) return 0; /* SSL_clear's own failure value: wrk's reconnect fails loudly */
    SSL_set_session(s, NULL);
    return real_clear(s);
}
