mod common;
use common::*;
use std::time::Duration;

#[tokio::test]
async fn raw_publish_and_subscribe() {
    let b = TestBroker::start();
    let mut c = RawClient::setup(&b.addr(), Duration::from_secs(30)).await;
    let req = sluice_protocol::PublishRequest {
        topic: "t".into(),
        messages: vec![sluice_protocol::NewMessage {
            payload: bytes::Bytes::from_static(b"hi"),
            ..Default::default()
        }],
    };
    c.request(1, "publish", sluice_protocol::encode(&req).unwrap())
        .await;
    let f = c.next(Duration::from_secs(5)).await.expect("reply");
    let reply: sluice_protocol::PublishReply =
        sluice_protocol::decode(&payload_of(&f).unwrap_or_else(|| panic!("{:?}", error_of(&f))))
            .unwrap();
    assert_eq!((reply.first_seq, reply.last_seq), (1, 1));
}
