# luma-proxy: one per server. A static binary on scratch: no shell, no package manager, no
# docker.sock. Runs unprivileged; SO_BINDTODEVICE on an unbound socket needs no capability.
# No CA bundle either: the ACME client trusts the compiled-in web roots (webpki-roots) plus
# LUMA_PROXY_ACME_CA_ROOT(_PEM), and resolves names through Docker's DNS, not libc.
FROM scratch
COPY luma-proxy /usr/local/bin/luma-proxy
# The state dir exists in the image with the right owner, so a new named volume inherits it.
COPY --chown=65532:65532 state/ /var/lib/luma-proxy/
USER 65532:65532
VOLUME /var/lib/luma-proxy
EXPOSE 8080 8443
ENTRYPOINT ["/usr/local/bin/luma-proxy"]
CMD ["serve"]
