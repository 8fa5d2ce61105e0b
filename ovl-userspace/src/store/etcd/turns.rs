//! Changes one process makes to the same part of the store take turns:
//! racing each other they could only collide in etcd, and every loser
//! re-reads the whole scope to try again (work that grows with the number
//! of racers). Changes from other processes still race optimistically.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use tokio::sync::{Mutex as Turn, OwnedMutexGuard};

use crate::store::Scope;

/// The turns of one store connection (shared by its clones).
#[derive(Clone, Default)]
pub struct Turns {
    scopes: Arc<Mutex<HashMap<String, Arc<Turn<()>>>>>,
}

impl Turns {
    /// Waits until no other change of this process holds `scope` (first
    /// come, first served); the turn ends when the guard drops.
    pub async fn take(&self, scope: Scope<'_>) -> OwnedMutexGuard<()> {
        let key = match scope {
            Scope::Networks => "networks".to_owned(),
            Scope::Network(name) | Scope::Endpoint(crate::store::Around { network: name, .. }) => {
                format!("network/{name}")
            }
            Scope::All => "all".to_owned(),
        };
        let turn = {
            let mut scopes = self.scopes.lock().unwrap_or_else(|p| p.into_inner());
            // Scopes nobody holds or waits for are forgotten: networks come
            // and go.
            scopes.retain(|_, t| Arc::strong_count(t) > 1);
            scopes.entry(key).or_default().clone()
        };
        turn.lock_owned().await
    }

    /// Scopes held or waited for now.
    #[cfg(test)]
    fn busy(&self) -> usize {
        let scopes = self.scopes.lock().unwrap_or_else(|p| p.into_inner());
        scopes.values().filter(|t| Arc::strong_count(t) > 1).count()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn changes_to_one_scope_take_turns_and_other_scopes_do_not_wait() {
        let turns = Turns::default();
        let first = turns.take(Scope::Network("a")).await;
        // Another network, and the network list, are free meanwhile.
        let other = tokio::time::timeout(Duration::from_secs(1), turns.take(Scope::Network("b")))
            .await
            .expect("another network does not wait");
        let list = tokio::time::timeout(Duration::from_secs(1), turns.take(Scope::Networks))
            .await
            .expect("the network list does not wait");
        // The same network waits until the first change is done.
        let waiting = {
            let turns = turns.clone();
            tokio::spawn(async move {
                let _turn = turns.take(Scope::Network("a")).await;
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "took a turn that was held");
        drop(first);
        tokio::time::timeout(Duration::from_secs(1), waiting)
            .await
            .expect("the turn passes on once released")
            .expect("the waiting task ran");
        drop((other, list));
        assert_eq!(turns.busy(), 0);
        // Forgotten scopes are dropped at the next take.
        let _again = turns.take(Scope::All).await;
        assert_eq!(turns.scopes.lock().unwrap().len(), 1);
    }
}
