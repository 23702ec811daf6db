//! Headers and framing: many, huge, duplicated and non-UTF-8 headers, lying lengths, bodies
//! that never end, `Expect`, pipelining and a 100 MB body.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::PATIENCE;
use crate::{answers, bare, exchange, one, read_all, Abused};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abusive_headers_get_json_4xx_and_leave_state_intact() {
    let srv = Abused::start().await;
    let acquire = "POST /v1/limiters/w/acquire HTTP/1.1\r\nhost: x\r\nconnection: close\r\n";
    let many = format!(
        "GET /v1/limiters/w HTTP/1.1\r\nhost: x\r\n{}\r\n",
        "x-a: b\r\n".repeat(200)
    );
    let huge = format!(
        "{acquire}content-type: application/json\r\nx-big: {}\r\ncontent-length: 2\r\n\r\n{{}}",
        "v".repeat(100_000)
    );
    let mut cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("200 headers", many.into_bytes(), 431),
        ("a 100 KB header value", huge.into_bytes(), 431),
        (
            "a NUL in a header value",
            format!("{acquire}content-type: application/json\r\nx-a: a\0b\r\n\r\n").into_bytes(),
            400,
        ),
        (
            "a header name with a space",
            format!("{acquire}bad name: 1\r\n\r\n").into_bytes(),
            400,
        ),
        (
            "a header line without a colon",
            format!("{acquire}nocolon\r\n\r\n").into_bytes(),
            400,
        ),
        (
            "a negative Content-Length",
            format!("{acquire}content-type: application/json\r\ncontent-length: -1\r\n\r\n")
                .into_bytes(),
            400,
        ),
        (
            "a Content-Length past u64",
            format!(
                "{acquire}content-type: application/json\r\ncontent-length: 99999999999999999999999\r\n\r\n"
            )
            .into_bytes(),
            400,
        ),
        (
            "Transfer-Encoding gzip (not chunked last)",
            format!("{acquire}content-type: application/json\r\ntransfer-encoding: gzip\r\n\r\n{{}}")
                .into_bytes(),
            400,
        ),
        (
            "a chunk size that is not hex",
            format!(
                "{acquire}content-type: application/json\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n{{}}\r\n0\r\n\r\n"
            )
            .into_bytes(),
            400,
        ),
        (
            "a chunk size past u64",
            format!(
                "{acquire}content-type: application/json\r\ntransfer-encoding: chunked\r\n\r\nfffffffffffffffffff\r\n{{}}\r\n0\r\n\r\n"
            )
            .into_bytes(),
            400,
        ),
        (
            "a Content-Length longer than the body (it never comes)",
            format!("{acquire}content-type: application/json\r\ncontent-length: 50\r\n\r\n{{\"permits\"")
                .into_bytes(),
            408,
        ),
        (
            "a chunked body that never ends",
            format!(
                "{acquire}content-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n5\r\n{{\"per\r\n"
            )
            .into_bytes(),
            408,
        ),
        (
            "a Content-Length shorter than the body",
            format!(
                "{acquire}content-type: application/json\r\ncontent-length: 3\r\n\r\n{{\"permits\": 1}}"
            )
            .into_bytes(),
            400,
        ),
        (
            "a non-UTF-8 Content-Type",
            [
                acquire.as_bytes(),
                b"content-type: application/\xff\xfe\r\ncontent-length: 2\r\n\r\n{}",
            ]
            .concat(),
            415,
        ),
        (
            "Content-Type text/plain before application/json",
            format!(
                "{acquire}content-type: text/plain\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{{}}"
            )
            .into_bytes(),
            415,
        ),
        (
            "a non-UTF-8 Idempotency-Key",
            [
                acquire.as_bytes(),
                b"content-type: application/json\r\nidempotency-key: \xff\xfe\r\ncontent-length: 2\r\n\r\n{}",
            ]
            .concat(),
            400,
        ),
        (
            "an Idempotency-Key of 10 KB",
            format!(
                "{acquire}content-type: application/json\r\nidempotency-key: {}\r\ncontent-length: 2\r\n\r\n{{}}",
                "i".repeat(10_000)
            )
            .into_bytes(),
            400,
        ),
        (
            "Expect: 100-continue with an invalid body",
            format!(
                "{acquire}content-type: application/json\r\nexpect: 100-continue\r\ncontent-length: 15\r\n\r\n{{\"permits\": -1}}"
            )
            .into_bytes(),
            400,
        ),
        (
            "Expect: 100-continue with 100 MB declared",
            format!(
                "{acquire}content-type: application/json\r\nexpect: 100-continue\r\ncontent-length: 100000000\r\n\r\n"
            )
            .into_bytes(),
            413,
        ),
        (
            "raw non-ASCII bytes in the request target",
            b"GET /v1/limiters/\xff\xfe HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n".to_vec(),
            400,
        ),
    ];
    // Duplicated headers where the first one is wrong: the first is what counts, and the
    // answer says what was wrong with it.
    cases.push((
        "two Idempotency-Keys, the first invalid",
        format!(
            "{acquire}content-type: application/json\r\nidempotency-key: a b\r\nidempotency-key: ok\r\ncontent-length: 2\r\n\r\n{{}}"
        )
        .into_bytes(),
        400,
    ));
    for (what, request, status) in cases {
        let answer = one(srv.addr(), &request).await;
        answer.api_error(what);
        assert_eq!(answer.status, status, "{what}: {}", answer.text);
        srv.intact(what).await;
    }
    srv.stop().await;
}

/// Headers that are odd but harmless are served normally (not refused, not a 5xx): a
/// non-UTF-8 or overlong `X-Request-Id` is replaced by a generated one; the same
/// `Content-Length` twice is one length.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_but_harmless_headers_are_served() {
    let srv = Abused::start().await;
    let get = "GET /v1/limiters/w HTTP/1.1\r\nhost: x\r\nconnection: close\r\n";
    for (what, request) in [
        (
            "a non-UTF-8 X-Request-Id",
            [get.as_bytes(), b"x-request-id: \xff\xfe\r\n\r\n"].concat(),
        ),
        (
            "a 10 KB X-Request-Id",
            format!("{get}x-request-id: {}\r\n\r\n", "r".repeat(10_000)).into_bytes(),
        ),
        (
            "no Host header",
            b"GET /v1/limiters/w HTTP/1.1\r\nconnection: close\r\n\r\n".to_vec(),
        ),
        ("HTTP/1.0", b"GET /v1/limiters/w HTTP/1.0\r\n\r\n".to_vec()),
    ] {
        let answer = one(srv.addr(), &request).await;
        assert_eq!(answer.status, 200, "{what}: {}", answer.text);
        let id = answer
            .head
            .lines()
            .find_map(|l| l.strip_prefix("x-request-id: "))
            .unwrap_or_else(|| panic!("{what}: no request id: {}", answer.text));
        assert_eq!(id.len(), 16, "{what}: a generated id: {}", answer.text);
    }
    let twice = one(
        srv.addr(),
        b"PUT /v1/limiters/p HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-type: application/json\r\ncontent-length: 2\r\ncontent-length: 2\r\n\r\n{}",
    )
    .await;
    assert_eq!(twice.status, 200, "{}", twice.text);
    srv.intact("odd headers").await;
    srv.stop().await;
}

/// A hundred bad requests pipelined on one kept-alive connection are answered in order, each
/// with a JSON 4xx, and the good one after them is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_bad_requests_are_each_answered() {
    let srv = Abused::start().await;
    let mut request = Vec::new();
    for i in 0..100 {
        let body = format!("{{\"permits\": {}}}", -i - 1);
        request.extend(
            format!(
                "POST /v1/limiters/w/acquire HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            )
            .into_bytes(),
        );
    }
    request.extend(bare("GET", "/healthz"));
    let all = exchange(srv.addr(), &request).await;
    assert_eq!(all.len(), 101, "{all:?}");
    for answer in &all[..100] {
        answer.refused(400, "invalid_request", Some("permits"), "pipelined");
    }
    assert_eq!(all[100].status, 200, "{}", all[100].text);
    srv.intact("pipelining").await;
    srv.stop().await;
}

/// 100 MB streamed as a chunked body: refused 413 once past the limit, the connection closed
/// rather than drained.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100_mb_chunked_body_is_413() {
    let srv = Abused::start().await;
    let mut stream = TcpStream::connect(srv.addr()).await.unwrap();
    stream
        .write_all(
            b"POST /v1/limiters/w/acquire HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
              transfer-encoding: chunked\r\n\r\n",
        )
        .await
        .unwrap();
    let (mut read, mut write) = stream.into_split();
    let writer = tokio::spawn(async move {
        let chunk = format!("100000\r\n{}\r\n", " ".repeat(0x10_0000));
        let mut sent = 0usize;
        while sent < 100 << 20 {
            if write.write_all(chunk.as_bytes()).await.is_err() {
                return sent;
            }
            sent += 0x10_0000;
        }
        sent
    });
    let mut out = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, read.read_to_end(&mut out))
        .await
        .expect("the server kept reading a 100 MB body");
    let all = answers(&out);
    assert!(
        !all.is_empty(),
        "no answer: {:?}",
        String::from_utf8_lossy(&out)
    );
    all[0].refused(413, "payload_too_large", None, "100 MB chunked");
    let sent = writer.await.unwrap();
    assert!(sent < 100 << 20, "the server read all 100 MB");
    srv.intact("100 MB").await;
    srv.stop().await;
}

/// The head cap is exact: a head of 64 KiB is served, one byte more is 431 (or 414 while the
/// request line has not ended), however the bytes arrive (hyper's own cap let heads of up to
/// about twice its buffer through when they came in large reads).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_head_cap_is_exact() {
    let srv = Abused::start().await;
    let head = |total: usize| {
        let start = "GET /v1/limiters/w HTTP/1.1\r\nhost: x\r\nconnection: close\r\nx-pad: ";
        let pad = total - start.len() - 4;
        format!("{start}{}\r\n\r\n", "p".repeat(pad)).into_bytes()
    };
    let at_cap = one(srv.addr(), &head(64 * 1024)).await;
    assert_eq!(at_cap.status, 200, "{}", at_cap.text);
    for total in [64 * 1024 + 1, 100_000, 130_000] {
        one(srv.addr(), &head(total)).await.refused(
            431,
            "headers_too_large",
            None,
            &format!("a head of {total} bytes"),
        );
    }
    let long_line = format!("GET /{} HTTP/1.1\r\nhost: x\r\n\r\n", "u".repeat(64 * 1024));
    one(srv.addr(), long_line.as_bytes()).await.refused(
        414,
        "uri_too_long",
        None,
        "a 64 KiB request line",
    );
    srv.intact("the head cap").await;
    srv.stop().await;
}

/// A client that speaks HTTP/2 with prior knowledge gets HTTP/2's own answer, GOAWAY
/// `HTTP_1_1_REQUIRED`, rather than a silently closed connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_preface_gets_goaway_http_1_1_required() {
    let srv = Abused::start().await;
    let mut stream = TcpStream::connect(srv.addr()).await.unwrap();
    // The preface and an empty SETTINGS frame, as an HTTP/2 client sends them.
    stream
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(PATIENCE, stream.read_to_end(&mut out))
        .await
        .expect("the server did not close")
        .unwrap();
    // SETTINGS (type 4) on stream 0, then GOAWAY (type 7) with error code 0xd.
    assert_eq!(
        out.get(..9),
        Some(&[0, 0, 0, 4, 0, 0, 0, 0, 0][..]),
        "{out:?}"
    );
    let goaway = &out[9..];
    assert_eq!(goaway.get(3), Some(&7), "{out:?}");
    assert_eq!(goaway.get(13..17), Some(&[0, 0, 0, 0xd][..]), "{out:?}");
    srv.intact("an HTTP/2 preface").await;
    srv.stop().await;
}

/// The cap holds for every head on a connection, not only the first of a read: two requests
/// pipelined in one write, the second with a 100 KB header, get 200 then 431 (hyper's own
/// cap let the second through: it came in the read that ended the first head).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipelined_head_over_the_cap_is_431_after_the_first_answer() {
    let srv = Abused::start().await;
    let second = |pad: usize| {
        format!(
            "GET /v1/limiters/w HTTP/1.1\r\nhost: x\r\nconnection: close\r\nx-pad: {}\r\n\r\n",
            "p".repeat(pad)
        )
    };
    // A first request with a body, so the second head starts after it, not after its head.
    let first = "PUT /v1/limiters/p HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
                 content-length: 2\r\n\r\n{}";
    let all = exchange(srv.addr(), format!("{first}{}", second(100_000)).as_bytes()).await;
    assert_eq!(all.len(), 2, "{all:?}");
    assert_eq!(all[0].status, 200, "{}", all[0].text);
    all[1].refused(431, "headers_too_large", None, "a pipelined 100 KB head");

    // At the cap exactly, the pipelined head is served; in its request line, 414.
    let start = "GET /v1/limiters/w HTTP/1.1\r\nhost: x\r\nconnection: close\r\nx-pad: ";
    let at_cap = second(64 * 1024 - start.len() - 4);
    assert_eq!(at_cap.len(), 64 * 1024);
    let all = exchange(srv.addr(), format!("{first}{at_cap}").as_bytes()).await;
    let statuses: Vec<u16> = all.iter().map(|a| a.status).collect();
    assert_eq!(statuses, [200, 200], "{all:?}");
    let over = second(64 * 1024 + 1 - start.len() - 4);
    let all = exchange(srv.addr(), format!("{first}{over}").as_bytes()).await;
    assert_eq!(all.len(), 2, "{all:?}");
    assert_eq!(all[0].status, 200, "{}", all[0].text);
    all[1].refused(
        431,
        "headers_too_large",
        None,
        "a pipelined head of 64 KiB + 1",
    );
    let long_line = format!("GET /{} HTTP/1.1\r\nhost: x\r\n\r\n", "u".repeat(64 * 1024));
    let all = exchange(srv.addr(), format!("{first}{long_line}").as_bytes()).await;
    assert_eq!(all.len(), 2, "{all:?}");
    assert_eq!(all[0].status, 200, "{}", all[0].text);
    all[1].refused(414, "uri_too_long", None, "a pipelined 64 KiB request line");

    // A chunked body between them: the second head is found after its last chunk.
    let chunked = "PUT /v1/limiters/p HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
                   transfer-encoding: chunked\r\n\r\n1\r\n{\r\n1;ext=1\r\n}\r\n0\r\nx-trailer: t\r\n\r\n";
    let all = exchange(
        srv.addr(),
        format!("{chunked}{}", second(100_000)).as_bytes(),
    )
    .await;
    assert_eq!(all.len(), 2, "{all:?}");
    assert_eq!(all[0].status, 200, "{}", all[0].text);
    all[1].refused(
        431,
        "headers_too_large",
        None,
        "a 100 KB head after a chunked body",
    );

    // The second head sent only once the first was answered: refused at once, in order.
    let mut stream = TcpStream::connect(srv.addr()).await.unwrap();
    stream.write_all(first.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = vec![0u8; 4096];
    while answers(&got).is_empty() {
        let n = tokio::time::timeout(PATIENCE, stream.read(&mut buf))
            .await
            .expect("the first request was not answered")
            .unwrap();
        assert!(n > 0, "closed before the first answer");
        got.extend_from_slice(&buf[..n]);
    }
    assert_eq!(answers(&got)[0].status, 200, "{}", answers(&got)[0].text);
    let _ = stream.write_all(second(100_000).as_bytes()).await;
    let rest = read_all(&mut stream).await;
    assert_eq!(rest.len(), 1, "{rest:?}");
    rest[0].refused(
        431,
        "headers_too_large",
        None,
        "a 100 KB head after an answer",
    );
    srv.intact("pipelined head cap").await;
    srv.stop().await;
}
