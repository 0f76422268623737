//! Hooks and the spawner, in a process of their own (hooks are global).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use threads::{Role, Stage};

#[test]
fn hooks_run_in_the_new_thread_in_stage_order_and_a_failure_stops_the_work() {
    let order = Arc::new(std::sync::Mutex::new(Vec::new()));
    let o = order.clone();
    threads::add_hook(
        Stage::Confine,
        Arc::new(move |role: &Role| {
            o.lock()
                .unwrap()
                .push(format!("confine {role} {}", threads::gettid()));
            match role {
                Role::Helper(n) if n == "refused" => Err("not this one".into()),
                _ => Ok(()),
            }
        }),
    );
    let o = order.clone();
    threads::add_hook(
        Stage::Place,
        Arc::new(move |role: &Role| {
            o.lock()
                .unwrap()
                .push(format!("place {role} {}", threads::gettid()));
            Ok(())
        }),
    );
    threads::start_spawner().unwrap();
    let h = threads::spawn(Role::Vcpu(0), threads::gettid).unwrap();
    let tid = h.tid();
    assert_eq!(h.join().unwrap(), tid);
    let seen = order.lock().unwrap().clone();
    let mine: Vec<_> = seen
        .iter()
        .filter(|l| l.ends_with(&format!(" {tid}")))
        .collect();
    assert_eq!(
        mine,
        vec![
            &format!("place vcpu 0 {tid}"),
            &format!("confine vcpu 0 {tid}")
        ]
    );
    assert!(seen.iter().any(|l| l.starts_with("confine spawner ")));

    let ran = Arc::new(AtomicBool::new(false));
    let r = ran.clone();
    let err = threads::spawn(Role::Helper("refused".into()), move || {
        r.store(true, Ordering::SeqCst)
    })
    .unwrap_err();
    assert!(err.to_string().contains("not this one"), "{err}");
    assert!(!ran.load(Ordering::SeqCst));
}
