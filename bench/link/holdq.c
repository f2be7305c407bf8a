/* holdq: hold every packet of an NFQUEUE for a fixed delay, then accept it.
 *
 * The emulated S3 link of bench/link.py: this kernel has no netem, so the one-way delay is
 * added in user space. An iptables rule sends the S3 port's packets to queue N; each is held
 * for DELAY_US microseconds from its arrival and then let through, in arrival order (the
 * delay is the same for all, so order is kept and nothing is reordered). Packets are copied
 * to user space only as far as their headers (the verdict needs just the id).
 *
 *   holdq QUEUE DELAY_US
 *
 * Built by bench/link.py with the system's cc and libnetfilter-queue (Debian:
 * libnetfilter-queue-dev). Runs until killed.
 */
#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <arpa/inet.h>
#include <linux/netfilter.h>
#include <libnetfilter_queue/libnetfilter_queue.h>

#define RING (1 << 20)

static uint32_t ids[RING];
static uint64_t due[RING];
static size_t head, tail; /* held packets: [head, tail) */
static uint64_t delay_us;

static uint64_t now_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

static int on_packet(struct nfq_q_handle *qh, struct nfgenmsg *msg, struct nfq_data *nfa, void *data) {
    (void)msg; (void)data;
    struct nfqnl_msg_packet_hdr *ph = nfq_get_msg_packet_hdr(nfa);
    if (!ph) return 0;
    uint32_t id = ntohl(ph->packet_id);
    if (tail - head >= RING) /* full: let it through now rather than drop it */
        return nfq_set_verdict(qh, id, NF_ACCEPT, 0, NULL);
    ids[tail % RING] = id;
    due[tail % RING] = now_us() + delay_us;
    tail++;
    return 0;
}

static void release_due(struct nfq_q_handle *qh) {
    uint64_t now = now_us();
    while (head < tail && due[head % RING] <= now) {
        nfq_set_verdict(qh, ids[head % RING], NF_ACCEPT, 0, NULL);
        head++;
    }
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: holdq QUEUE DELAY_US\n");
        return 2;
    }
    int queue = atoi(argv[1]);
    delay_us = strtoull(argv[2], NULL, 10);
    struct nfq_handle *h = nfq_open();
    if (!h) { perror("nfq_open"); return 1; }
    struct nfq_q_handle *qh = nfq_create_queue(h, queue, &on_packet, NULL);
    if (!qh) { perror("nfq_create_queue"); return 1; }
    if (nfq_set_mode(qh, NFQNL_COPY_META, 0) < 0) { perror("nfq_set_mode"); return 1; }
    nfq_set_queue_maxlen(qh, 1 << 18);
    int fd = nfq_fd(h);
    int big = 64 << 20;
    setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &big, sizeof big);
    char buf[65536];
    fprintf(stderr, "holdq: queue %d, %llu us\n", queue, (unsigned long long)delay_us);
    for (;;) {
        int timeout = -1;
        if (head < tail) {
            uint64_t now = now_us(), next = due[head % RING];
            timeout = next > now ? (int)((next - now + 999) / 1000) : 0;
        }
        struct pollfd p = {fd, POLLIN, 0};
        int n = poll(&p, 1, timeout);
        if (n > 0) {
            for (;;) { /* drain what is queued without blocking */
                ssize_t got = recv(fd, buf, sizeof buf, MSG_DONTWAIT);
                if (got <= 0) {
                    if (got < 0 && errno == ENOBUFS) continue; /* the kernel dropped some: go on */
                    break;
                }
                nfq_handle_packet(h, buf, (int)got);
            }
        }
        release_due(qh);
    }
}
