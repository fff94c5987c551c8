use super::*;

fn body(channel: &str, payload: &str) -> Vec<u8> {
    let mut b = 7i32.to_be_bytes().to_vec();
    b.extend_from_slice(channel.as_bytes());
    b.push(0);
    b.extend_from_slice(payload.as_bytes());
    b.push(0);
    b
}

fn sub(tx: mpsc::Sender<Notification>) -> Subscriber {
    Subscriber {
        deliver: tx,
        overflow: Arc::default(),
    }
}

fn listen(channel: &str, client: u64, deliver: Subscriber) -> Command {
    Command::Listen {
        channel: channel.into(),
        client,
        deliver,
        done: None,
    }
}

#[tokio::test]
async fn subscriptions_listen_once_and_fan_out() {
    let mut hub = Hub::default();
    let (tx1, mut rx1) = mpsc::channel(4);
    let (tx2, mut rx2) = mpsc::channel(4);
    hub.apply(listen("acme.ev", 1, sub(tx1)));
    hub.apply(listen("acme.ev", 2, sub(tx2)));
    assert_eq!(hub.next_statement(), Some("LISTEN \"acme.ev\"".into()));
    assert_eq!(hub.next_statement(), None, "one statement in flight");
    hub.statement_done();
    assert_eq!(hub.next_statement(), None, "already listening");
    let owners = Owners::default();
    owners.lock().unwrap().attach(7, 70, 100);
    dispatch(&mut hub.subscribers, &owners, &body("acme.ev", "hi"));
    dispatch(
        &mut hub.subscribers,
        &owners,
        &body("globex.ev", "not yours"),
    );
    let got = rx1.recv().await.unwrap();
    assert_eq!(
        (got.payload.as_str(), got.pid),
        ("hi", 70),
        "the client's pid"
    );
    assert_eq!(rx2.recv().await.unwrap().payload, "hi");
    assert!(rx1.try_recv().is_err());
    hub.apply(Command::Unlisten {
        channel: None,
        client: 1,
    });
    assert_eq!(hub.next_statement(), None);
    hub.apply(Command::Unlisten {
        channel: Some("acme.ev".into()),
        client: 2,
    });
    assert_eq!(hub.next_statement(), Some("UNLISTEN \"acme.ev\"".into()));
    assert!(hub.subscribers.is_empty());
}

#[tokio::test]
async fn one_tenants_thousands_of_channels_wait_their_turn() {
    let mut hub = Hub::default();
    let (tx, _rx) = mpsc::channel(4);
    for i in 0..1000 {
        hub.apply(listen(&format!("flood.c{i}"), 1, sub(tx.clone())));
    }
    let first = hub.next_statement().unwrap();
    assert_eq!(first.matches("LISTEN").count(), CHUNK);
    // Another tenant's LISTEN arrives while the flood's first chunk runs: it goes next.
    let (done, mut confirmed) = oneshot::channel();
    hub.apply(Command::Listen {
        channel: "calm.ev".into(),
        client: 2,
        deliver: sub(tx.clone()),
        done: Some(done),
    });
    hub.statement_done();
    assert_eq!(hub.next_statement(), Some("LISTEN \"calm.ev\"".into()));
    assert!(
        confirmed.try_recv().is_err(),
        "confirmed before the server listens"
    );
    hub.statement_done();
    assert!(confirmed.try_recv().is_ok());
    while hub.next_statement().is_some() {
        hub.statement_done();
    }
    assert_eq!(hub.listening.len(), 1001);
    // The flood leaving is chunked the same way.
    hub.apply(Command::Unlisten {
        channel: None,
        client: 1,
    });
    let mut statements = 0;
    while let Some(sql) = hub.next_statement() {
        assert!(sql.matches("LISTEN").count() <= CHUNK);
        statements += 1;
        hub.statement_done();
    }
    assert!(statements >= 1000 / CHUNK);
    assert_eq!(hub.listening.len(), 1, "only calm.ev is left");
}

#[test]
fn a_notification_is_credited_to_the_client_that_committed_it() {
    let note = |p: &str| ("acme.ev".to_owned(), p.to_owned());
    let mut s = Senders::default();
    // Client 70 commits on backend 7; the backend passes to client 80 before the hub
    // sees the notification: it is still 70's.
    s.attach(7, 70, 100);
    s.committed(7, 70, vec![note("a")]);
    s.attach(7, 80, 100);
    assert_eq!(s.sender(7, &note("a")), Some(70));
    // The hub faster than the session: credited to the backend's client then, and the
    // later record of the commit does not linger to mislead a later one.
    s.attach(7, 90, 100);
    assert_eq!(s.sender(7, &note("b")), Some(90));
    s.committed(7, 90, vec![note("b")]);
    s.attach(7, 95, 100);
    assert_eq!(
        s.sender(7, &note("b")),
        Some(95),
        "a new one from the next client"
    );
    // Unknown backends (another application's session) keep their pid.
    assert_eq!(s.sender(8, &note("c")), None);
}
