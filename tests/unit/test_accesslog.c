/* src/accesslog.c: JSON and text lines, escaping of hostile bytes. */
#include "testlib.h"

#include "accesslog.h"

static struct accesslog_entry entry(const char *path, const struct kv *fields)
{
    return (struct accesslog_entry){
        .client = "127.0.0.1", .method = "GET", .host = "h", .path = path,
        .path_len = strlen(path), .status = 200, .bytes_in = 10, .bytes_out = 20,
        .duration_us = 1500, .route = "api", .endpoint = NULL, .fields = fields,
    };
}

static void test_protocol(void)
{
    char out[1024];
    struct accesslog_entry e = entry("/p", NULL);
    e.protocol = "HTTP/2.0";
    size_t n = accesslog_format(&e, out, sizeof(out));
    out[n] = 0;
    CHECK(strstr(out, ",\"protocol\":\"HTTP/2.0\",") != NULL);
    n = accesslog_format_text(&e, "%{method} %{path} %{protocol}", out, sizeof(out));
    CHECK_STR(out, n, "GET /p HTTP/2.0\n");
    e.protocol = NULL; /* the request line was never read */
    n = accesslog_format(&e, out, sizeof(out));
    out[n] = 0;
    CHECK(strstr(out, ",\"protocol\":null,") != NULL);
    n = accesslog_format_text(&e, "%{protocol}", out, sizeof(out));
    CHECK_STR(out, n, "-\n");
}

static void test_text_escapes(void)
{
    char out[512];
    struct accesslog_entry e = entry("/a\"b\\c\n\x01\xff", NULL);
    size_t n = accesslog_format_text(&e, "%{path}|%{status}|%{upstream}|%{upstream_ms}", out, sizeof(out));
    CHECK_STR(out, n, "/a\\\"b\\\\c\\x0a\\x01\\xff|200|-|-\n");
}

static void test_text_fields_and_literals(void)
{
    char out[512];
    struct kv f2 = { NULL, "trace_id", "t1" }, f1 = { &f2, "request_id", "r\"1" };
    struct accesslog_entry e = entry("/x", &f1);
    size_t n = accesslog_format_text(&e, "id=%{request_id} t=%{trace_id} m=%{missing} 100% %{route}",
                                     out, sizeof(out));
    CHECK_STR(out, n, "id=r\\\"1 t=t1 m=- 100% api\n");
    n = accesslog_format_text(&e, "%{duration_ms}", out, sizeof(out));
    CHECK_STR(out, n, "1.500\n");
}

static void test_text_bounded(void)
{
    char out[16];
    struct accesslog_entry e = entry("/a-very-long-path-indeed", NULL);
    size_t n = accesslog_format_text(&e, "%{path}%{path}", out, sizeof(out));
    CHECK(n == sizeof(out));
    CHECK(out[n - 1] == '\n');
}

static void test_template_check(void)
{
    char err[128];
    CHECK(accesslog_template_check("%{a} %{b} 50%", err, sizeof(err)) == 0);
    CHECK(accesslog_template_check("%{a", err, sizeof(err)) < 0);
    CHECK(accesslog_template_check("x %{}", err, sizeof(err)) < 0);
}

static void test_json_escapes(void)
{
    char out[4096];
    struct accesslog_entry e = entry("/q\"\n", NULL);
    size_t n = accesslog_format(&e, out, sizeof(out));
    out[n] = 0;
    CHECK(strstr(out, "\"path\":\"/q\\\"\\u000a\"") != NULL);
    CHECK(out[n - 1] == '\n' && !memchr(out, '\n', n - 1));
}

int main(void)
{
    test_protocol();
    test_text_escapes();
    test_text_fields_and_literals();
    test_text_bounded();
    test_template_check();
    test_json_escapes();
    return test_summary();
}
