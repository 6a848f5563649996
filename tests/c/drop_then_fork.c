/*
 * A process that drops privileges after its first VFIO call, then forks: the parent
 * keeps its connection to the daemon; the child, of the new uid, cannot reach the
 * private daemon's socket (docs/run.md, Limits).  Prints what each open gives.
 */
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

int main(void)
{
    int c = open("/dev/vfio/vfio", O_RDWR);
    printf("parent as root: %s\n", c < 0 ? strerror(errno) : "ok");
    if (setgroups(0, NULL) || setgid(1000) || setuid(1000))
        return perror("dropping privileges"), 1;
    int c2 = open("/dev/vfio/vfio", O_RDWR);
    printf("parent as 1000: %s\n", c2 < 0 ? strerror(errno) : "ok");
    fflush(stdout);
    pid_t p = fork();
    if (p == 0) {
        int d = open("/dev/vfio/vfio", O_RDWR);
        printf("child: %s\n", d < 0 ? strerror(errno) : "ok");
        fflush(stdout);
        _exit(0);
    }
    waitpid(p, NULL, 0);
    return 0;
}
