// A WAGI program: a WASI preview 1 command that answers an HTTP request as CGI does. The
// request comes in environment variables and stdin; the response goes to stdout, headers
// first, then a blank line, then the body. `samepage serve` runs it for each request.
//
// It answers with what it was given (method, paths, query, arguments, a header, the
// function's GREETING, the body), and, to exercise the host: PATH_INFO /fail exits with
// status 3, /garbage writes no headers, /redirect answers with a Location.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *env(const char *name) {
    const char *value = getenv(name);
    return value ? value : "";
}

int main(int argc, char **argv) {
    const char *path = env("PATH_INFO");
    if (strcmp(path, "/fail") == 0) {
        return 3;
    }
    if (strcmp(path, "/garbage") == 0) {
        puts("no headers here");
        return 0;
    }
    if (strcmp(path, "/redirect") == 0) {
        printf("Location: /elsewhere\n\n");
        return 0;
    }
    printf("Content-Type: text/plain\n");
    printf("X-Wagi-Args: %d\n\n", argc);
    printf("method=%s\n", env("REQUEST_METHOD"));
    printf("script=%s\n", env("SCRIPT_NAME"));
    printf("path_info=%s\n", path);
    printf("query=%s\n", env("QUERY_STRING"));
    printf("header=%s\n", env("HTTP_X_TEST"));
    printf("greeting=%s\n", env("GREETING"));
    for (int i = 1; i < argc; i++) {
        printf("arg=%s\n", argv[i]);
    }
    printf("body=");
    char buffer[4096];
    size_t read;
    while ((read = fread(buffer, 1, sizeof buffer, stdin)) > 0) {
        fwrite(buffer, 1, read, stdout);
    }
    printf("\n");
    return 0;
}
